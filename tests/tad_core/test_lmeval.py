"""lm-eval task YAML -> canonical samples: templates, few-shot, stop sequences, filters, local data, errors."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from tad_core.datasets import load_dataset, validate_jsonl
from tad_core.datasets.validate import dumps_jsonl
from tad_core.extraction import extract_answer
from tad_core.lmeval import WHOLE_OUTPUT_PATTERN, LmEvalTaskError, convert_task

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "lmeval"

DOCS = [
    {"q": "What is frozen water called?", "opts": ["ice", "steam"], "label": 0, "name": "ice"},
    {"q": "How many legs does a spider have?", "opts": ["six", "eight"], "label": 1, "name": "eight"},
    {"q": "What color is the sky?", "opts": ["blue", "red"], "label": 0, "name": "blue"},
    {"q": "What do bees make?", "opts": ["milk", "honey"], "label": 1, "name": "honey"},
    {"q": "Which is a planet?", "opts": ["Mars", "Moon"], "label": 0, "name": "Mars"},
]


def write_task(tmp: Path, yaml_text: str, docs: list[dict] = DOCS, name: str = "task.yaml",
               data: str = "docs.jsonl") -> Path:
    (tmp / data).write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = tmp / name
    path.write_text(yaml_text)
    return path


MC = """task: mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Q: {{q}}\\nA:"
doc_to_choice: opts
doc_to_target: label
"""


def test_fixture_task_with_include_and_first_n_renders_lmeval_requests() -> None:
    conv = convert_task(FIXTURES / "science_mc.yaml")
    assert (conv.task, conv.split, conv.output_type, conv.num_fewshot) == ("tiny_science", "test", "multiple_choice", 1)
    s = conv.samples[0]
    # first_n: the first train document, "doc_to_text + ' ' + gold choice + '\n\n'", before every test document
    assert s.prompt == ("Question: What color is the sky on a clear day?\nAnswer: blue\n\n"
                        "Question: Which gas do plants absorb from the air?\nAnswer:")
    assert all(x.prompt.startswith("Question: What color is the sky on a clear day?\nAnswer: blue\n\n")
               for x in conv.samples)
    assert s.choices == ("oxygen", "carbon dioxide", "helium") and s.answer == 1
    assert [c for _, c in s.contexts_and_continuations()] == [" oxygen", " carbon dioxide", " helium"]
    assert [x.answer for x in conv.samples] == [1, 0, 2, 1]
    yaml_hash = hashlib.sha256((FIXTURES / "science_mc.yaml").read_bytes()).hexdigest()
    assert conv.yaml_sha256 == yaml_hash and s.metadata["lmeval"]["yaml_sha256"] == yaml_hash
    assert s.metadata["doc"]["id"] == "s1" and s.metadata["lmeval"]["doc_id"] == 0
    roles = {src.role: Path(src.path).name for src in conv.sources}
    assert roles == {"yaml": "science_mc.yaml", "include": "science_base.yaml", "data:test": "science_test.jsonl",
                     "data:train": "science_train.jsonl"}
    validate_jsonl(dumps_jsonl(conv.samples))  # the converted set obeys every canonical rule


def test_field_names_templates_lists_and_targets(tmp_path: Path) -> None:
    path = write_task(tmp_path, MC)
    assert [s.answer for s in convert_task(path).samples] == [0, 1, 0, 1, 0]
    # doc_to_target as the choice text (a field), as a template giving digits, and as a template giving the text
    for target, logged in (("name", "eight"), ('"{{label}}"', 1), ('"{{opts[label]}}"', "eight")):
        conv = convert_task(write_task(tmp_path, MC.replace("doc_to_target: label", f"doc_to_target: {target}")))
        assert [s.answer for s in conv.samples] == [0, 1, 0, 1, 0], target
        assert conv.samples[1].metadata["lmeval"]["target"] == logged  # what lm-eval logs as the target
    # doc_to_choice as a YAML list and as a template rendering a list literal; doc_to_text as a field name
    conv = convert_task(write_task(tmp_path, MC.replace("doc_to_choice: opts", "doc_to_choice: ['yes', 'no']")
                                   .replace('doc_to_text: "Q: {{q}}\\nA:"', "doc_to_text: q")))
    assert conv.samples[1].choices == ("yes", "no") and conv.samples[1].prompt == "How many legs does a spider have?"
    conv = convert_task(write_task(tmp_path, MC.replace("doc_to_choice: opts", 'doc_to_choice: "{{[opts[1], opts[0]]}}"')))
    assert conv.samples[0].choices == ("steam", "ice")
    # Jinja filters and lm-eval's regex_replace
    conv = convert_task(write_task(tmp_path, MC.replace('"Q: {{q}}\\nA:"', '"{{q|upper|regex_replace(\'[?]\', \'!\')}}"')))
    assert conv.samples[0].prompt == "WHAT IS FROZEN WATER CALLED!"


def test_description_delimiters_and_target_delimiter(tmp_path: Path) -> None:
    text = MC + ('description: "Answer about {{q[:4]}}.\\n\\n"\nnum_fewshot: 2\nfewshot_split: test\n'
                 'fewshot_delimiter: "\\n###\\n"\nfewshot_config:\n  sampler: first_n\n')
    conv = convert_task(write_task(tmp_path, text))
    # fewshot_split == test_split: the document itself is dropped from the first n+1 (lm-eval's ContextSampler)
    assert conv.samples[0].prompt == ("Answer about What.\n\nQ: How many legs does a spider have?\nA: eight\n###\n"
                                      "Q: What color is the sky?\nA: blue\n###\nQ: What is frozen water called?\nA:")
    assert conv.samples[3].prompt.count("\n###\n") == 2 and "A: ice\n###\nQ: How many" in conv.samples[3].prompt
    # a choice is scored after one space, always (as lm-eval joins target_delimiter " "); other delimiters, and ""
    # before choices that start with a space (once accepted by skipping the space), cannot be scored exactly
    spaced = [{**d, "opts": [" " + o for o in d["opts"]]} for d in DOCS]
    assert [c for _, c in convert_task(write_task(tmp_path, MC, spaced)).samples[0].contexts_and_continuations()] \
        == ["  ice", "  steam"]
    for delimiter, docs in (('""', spaced), ('": "', DOCS)):
        with pytest.raises(LmEvalTaskError, match="target_delimiter") as e:
            convert_task(write_task(tmp_path, MC + f'target_delimiter: {delimiter}\n', docs))
        assert e.value.key == "target_delimiter"


def _lmeval_contexts(yaml_path: Path, seed: int) -> list[str]:
    """lm-eval's own few-shot context of every evaluated document of a local task (its TaskManager, offline)."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import yaml
    from lm_eval.tasks import TaskManager

    name = yaml.safe_load(yaml_path.read_text())["task"]
    task = TaskManager(include_path=str(yaml_path.parent), include_defaults=False).load_task_or_group([name])[name]
    task.set_fewshot_seed(seed)
    return [task.fewshot_context(doc, task.config.num_fewshot) for doc in task.eval_docs]


SPLITS = {  # data_files and split keys: lm-eval passes the document to its sampler when fewshot_split == test_split
    "train + test (shots from train)": ("    test: {d}/test.jsonl\n    train: {d}/train.jsonl\n",
                                        "test_split: test\ntraining_split: train\n"),
    "train + validation (neither split set: the document is dropped)": (
        "    train: {d}/train.jsonl\n    validation: {d}/val.jsonl\n",
        "training_split: train\nvalidation_split: validation\n"),
    "validation only (shots from itself)": ("    validation: {d}/val.jsonl\n", "validation_split: validation\n"),
    "test only, fewshot_split test": ("    test: {d}/test.jsonl\n", "test_split: test\nfewshot_split: test\n"),
}


@pytest.mark.parametrize("layout", list(SPLITS))
@pytest.mark.parametrize("sampler", ["default", "first_n"])
def test_fewshot_contexts_equal_lmevals_own(tmp_path: Path, layout: str, sampler: str) -> None:
    """Every converted prompt is the context lm-eval 0.4 itself builds for that document, for each way a task can
    name its splits. (A train + validation task drew n shots and dropped the document, where lm-eval draws n + 1,
    and a pool without the document was filtered all the same.)"""
    docs = [{"q": f"q{i}", "opts": ["a", "b", "c"], "label": i % 3} for i in range(8)]
    for name in ("train", "val", "test"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    files, keys = SPLITS[layout]
    text = (f"task: shots_{abs(hash((layout, sampler))) % 10**6}\ndataset_path: json\ndataset_kwargs:\n  "
            f"data_files:\n{files.format(d=tmp_path)}{keys}output_type: multiple_choice\n"
            'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_choice: opts\ndoc_to_target: label\nnum_fewshot: 3\n'
            f"fewshot_config:\n  sampler: {sampler}\n")
    path = tmp_path / "task.yaml"
    path.write_text(text)
    for seed in (1234, 7):
        ours = [s.prompt for s in convert_task(path, fewshot_seed=seed).samples]
        assert ours == _lmeval_contexts(path, seed), (layout, sampler, seed)


def test_seeded_fewshot_is_reproducible_and_follows_the_seed(tmp_path: Path) -> None:
    same_split = convert_task(write_task(tmp_path, MC + "num_fewshot: 2\nfewshot_split: test\n"), fewshot_seed=7)
    assert all(s.id not in s.prompt for s in same_split.samples)
    again = convert_task(write_task(tmp_path, MC + "num_fewshot: 2\nfewshot_split: test\n"), fewshot_seed=7)
    assert [s.prompt for s in again.samples] == [s.prompt for s in same_split.samples]
    other = convert_task(write_task(tmp_path, MC + "num_fewshot: 2\nfewshot_split: test\n"), fewshot_seed=8)
    assert [s.prompt for s in other.samples] != [s.prompt for s in same_split.samples]


GEN = """task: gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{q}}\\nA:"
doc_to_target: name
"""


def test_generation_until_and_filters() -> None:
    conv = convert_task(FIXTURES / "arith_gen.yaml")
    s = conv.samples[1]
    assert (s.prompt, s.reference, s.stop) == ("Q: What is 10 - 4?\nA:", "6", ("\n", "Q:"))
    assert s.answer_pattern == "(-?[0-9]+)" and s.extract == "first-match"
    assert extract_answer("the result is 6, not 7", s) == "6"
    assert s.metadata["lmeval"]["filter"] == "number"
    assert any("ignores case" in n for n in conv.notes)


def test_generation_defaults_and_filter_choice(tmp_path: Path) -> None:
    conv = convert_task(write_task(tmp_path, GEN))  # lm-eval defaults: until = [fewshot_delimiter], whole output
    s = conv.samples[0]
    assert s.stop == ("\n\n",) and s.answer_pattern == WHOLE_OUTPUT_PATTERN and s.reference == "ice"
    assert extract_answer("  ice \nmore", s) == "ice \nmore".strip()
    conv = convert_task(write_task(tmp_path, GEN + "generation_kwargs:\n  until: '.'\n"))
    assert conv.samples[0].stop == (".",)
    two = GEN + """filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "Answer: (\\\\w+)"
      - function: take_first
  - name: loose
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
"""
    with pytest.raises(LmEvalTaskError, match="2 filter pipelines") as e:
        convert_task(write_task(tmp_path, two))
    assert e.value.key == "filter_list"
    assert convert_task(write_task(tmp_path, two), filter_name="loose").samples[0].answer_pattern == r"(\w+)"
    strict = convert_task(write_task(tmp_path, two), filter_name="strict").samples[0]
    assert extract_answer("I think. Answer: steam", strict) == "steam"


def test_csv_data_and_split_roles(tmp_path: Path) -> None:
    (tmp_path / "val.csv").write_text("q,a,b,label\nWhat is 1+1?,two,three,0\nWhat is 2+1?,two,three,1\n")
    yaml_text = """task: csvtask
dataset_path: csv
dataset_kwargs:
  data_files:
    validation: val.csv
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: "{{[a, b]}}"
doc_to_target: label
"""
    (tmp_path / "t.yaml").write_text(yaml_text)
    conv = convert_task(tmp_path / "t.yaml")  # default split: validation_split (no test_split)
    assert conv.split == "validation" and [s.answer for s in conv.samples] == [0, 1]
    assert conv.samples[1].metadata["doc"] == {"q": "What is 2+1?", "a": "two", "b": "three", "label": 1}
    assert convert_task(tmp_path / "t.yaml", split="val").split == "validation"  # our split name, by role


def test_load_dataset_lmeval_reference(tmp_path: Path) -> None:
    ref = f"lmeval:{FIXTURES / 'science_mc.yaml'}"
    ds = load_dataset(ref, split="test")
    assert ds.name == "tiny_science" and ds.task_type == "mc" and len(ds) == 4
    assert ds.content_hash == hashlib.sha256(dumps_jsonl(convert_task(FIXTURES / "science_mc.yaml").samples)).hexdigest()
    assert ds.source.startswith("lmeval:") and "sha256=" in ds.source
    assert len(load_dataset(ref, split="test", limit=2)) == 2
    assert load_dataset(ref, split="test").content_hash == ds.content_hash
    with pytest.raises(LmEvalTaskError, match="'val' is not a split"):
        load_dataset(ref, split="val")  # the task has no validation split


@pytest.mark.parametrize(("edit", "key"), [
    (lambda t: t + "bogus_key: 1\n", "bogus_key"),
    (lambda t: t.replace('doc_to_text: "Q: {{q}}\\nA:"\n', ""), "doc_to_text"),
    (lambda t: t.replace("doc_to_choice: opts\n", ""), "doc_to_choice"),
    (lambda t: t.replace("dataset_path: json", "dataset_path: allenai/ai2_arc"), "dataset_path"),
    (lambda t: t + "process_docs: !function utils.process_docs\n", "process_docs"),
    (lambda t: t.replace("output_type: multiple_choice", "output_type: loglikelihood"), "output_type"),
    (lambda t: t + "metric_list:\n  - metric: f1\n", "metric_list[0].metric"),
    (lambda t: t + "fewshot_config:\n  sampler: balanced\n", "fewshot_config.sampler"),
    (lambda t: t.replace("doc_to_target: label", "doc_to_target: 7"), "doc_to_target"),
    (lambda t: t.replace("{{q}}", "{{question}}"), "doc_to_text"),
    (lambda t: t.replace("test: docs.jsonl", "test: missing.jsonl"), "dataset_kwargs.data_files.test"),
    (lambda t: t.replace("test_split: test", "test_split: nosuch"), "test_split"),
    (lambda t: t + "num_fewshot: 1\n", "num_fewshot"),
    (lambda t: t + "include: nowhere.yaml\n", "include"),
])
def test_bad_yaml_names_the_key(tmp_path: Path, edit, key: str) -> None:
    with pytest.raises(LmEvalTaskError) as e:
        convert_task(write_task(tmp_path, edit(MC)))
    assert e.value.key == key and key in str(e.value)


@pytest.mark.parametrize(("extra", "key"), [
    ("generation_kwargs:\n  max_gen_toks: 32\n", "generation_kwargs.max_gen_toks"),
    ("generation_kwargs:\n  do_sample: true\n", "generation_kwargs.do_sample"),
    ("filter_list:\n  - name: f\n    filter:\n      - function: lowercase\n", "filter_list.f.filter[0]"),
    ("filter_list:\n  - name: f\n    filter:\n      - function: regex\n        regex_pattern: '(a'\n",
     "filter_list.f.filter[0].regex_pattern"),
    ("filter_list:\n  - name: f\n    filter:\n      - function: regex\n        group_select: -1\n",
     "filter_list.f.filter[0].group_select"),
    ("metric_list:\n  - metric: exact_match\n    regexes_to_ignore: [',']\n", "metric_list[0].regexes_to_ignore"),
])
def test_bad_generation_settings_name_the_key(tmp_path: Path, extra: str, key: str) -> None:
    with pytest.raises(LmEvalTaskError) as e:
        convert_task(write_task(tmp_path, GEN + extra))
    assert e.value.key == key


def test_includes_search_paths_and_cycles(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "base.yaml").write_text(MC.replace("task: mc\n", "").replace("docs.jsonl", "data.jsonl")
                                      + "doc_to_target: name\n")
    (shared / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    child = tmp_path / "child.yaml"
    child.write_text("include: base.yaml\ntask: child\ndoc_to_target: label\n")
    with pytest.raises(LmEvalTaskError, match="--include-path") as e:
        convert_task(child)
    assert e.value.key == "include"
    conv = convert_task(child, include_paths=[shared])  # data files resolve next to the YAML that names them
    assert conv.task == "child" and len(conv.samples) == 5 and conv.samples[1].answer == 1
    (tmp_path / "a.yaml").write_text("include: b.yaml\ntask: a\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(LmEvalTaskError, match="cycle"):
        convert_task(tmp_path / "a.yaml")


def test_sandboxed_templates(tmp_path: Path) -> None:
    """Templates come from users' files: Python internals stay out of reach (jinja2's sandbox)."""
    with pytest.raises(LmEvalTaskError, match="unsafe") as e:
        convert_task(write_task(tmp_path, MC.replace('"Q: {{q}}\\nA:"', '"{{ q.__class__.__mro__[1].__subclasses__() }}"')))
    assert e.value.key == "doc_to_text"


def test_canonical_rules_apply_and_name_the_document(tmp_path: Path) -> None:
    """A converted task obeys every canonical rule; the error names the lm-eval document, not our line."""
    from tad_core.datasets import DatasetValidationError

    docs = [*DOCS[:2], {**DOCS[2], "opts": ["only one"], "label": 0}]
    with pytest.raises(DatasetValidationError, match=r"split test document 2: field 'choices': needs at least 2"):
        load_dataset(f"lmeval:{write_task(tmp_path, MC, docs)}", split="test")


def test_arc_style_yaml_from_lmeval(tmp_path: Path) -> None:
    """lm-eval's own arc_easy.yaml wording (templates over nested fields, `.index` in doc_to_target), local data."""
    doc = {"id": "Mercury_1", "question": "Which is a mammal?", "answerKey": "B",
           "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}}
    yaml_text = """task: arc_easy_local
tag: [ai2_arc]
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: docs.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: "{{choices.label.index(answerKey)}}"
doc_to_choice: "{{choices.text}}"
should_decontaminate: false
doc_to_decontamination_query: "Question: {{question}}\\nAnswer:"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    [s] = convert_task(write_task(tmp_path, yaml_text, [doc])).samples
    assert (s.prompt, s.choices, s.answer) == ("Question: Which is a mammal?\nAnswer:", ("shark", "whale", "trout"), 1)


def test_errors_name_the_split_and_document(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps({**DOCS[0], "label": 5}) + "\n")
    text = MC.replace("    test: docs.jsonl", "    test: docs.jsonl\n    train: train.jsonl") + \
        "num_fewshot: 1\nfewshot_split: train\n"
    with pytest.raises(LmEvalTaskError, match=r"doc_to_target: train document 0: 5 is neither an index") as e:
        convert_task(write_task(tmp_path, text))  # the bad gold is in a demonstration, not in the test split
    assert e.value.key == "doc_to_target"
    with pytest.raises(LmEvalTaskError, match=r"test document 3: expected a list of strings"):
        convert_task(write_task(tmp_path, MC, [*DOCS[:3], {**DOCS[3], "opts": "milk"}]))


def test_data_file_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tad_core.lmeval as lmeval

    path = write_task(tmp_path, MC)
    monkeypatch.setattr(lmeval, "MAX_DATA_FILE_BYTES", (tmp_path / "docs.jsonl").stat().st_size - 1)
    with pytest.raises(LmEvalTaskError, match="over the limit") as e:
        convert_task(path)
    assert e.value.key == "dataset_kwargs.data_files.test"
