"""Parity with lm-evaluation-harness itself: its `hf` backend and our engine on the same local task YAMLs and the
same tiny random-init model (base, and base + LoRA through lm-eval's `peft=`).

lm-eval (pinned in the test dependencies) is run through its Python API with `log_samples=True`, offline, on
local `data_files`; we compare per sample, so a convention that differs (a delimiter, a few-shot draw, acc_norm's
length, where a generation is cut) fails here even when the aggregate happens to agree.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tad_core.evaluate import EvalConfig, evaluate
from tad_core.lmeval import convert_task
from tad_core.models import load_pair

BATCH = 4
MAX_NEW_TOKENS = 8

QUESTIONS = [
    ("Which gas do plants absorb from the air?", ["oxygen", "carbon dioxide", "helium"], 1),
    ("What is frozen water called?", ["ice", "steam", "fog", "liquid nitrogen"], 0),
    ("Which planet is closest to the Sun?", ["Venus", "Mars", "Mercury"], 2),
    ("How many legs does a spider have?", ["six", "eight"], 1),
    ("What do bees make?", ["milk", "honey", "silk thread"], 1),
    ("Which animal barks?", ["a cat", "a dog"], 1),
    ("What is the boiling point of water in Celsius?", ["100", "50", "0", "212"], 0),
    ("Which is the largest ocean?", ["the Atlantic", "the Pacific Ocean", "the Arctic"], 1),
    ("Which metal is liquid at room temperature?", ["mercury", "iron", "copper"], 0),
    ("What do caterpillars become?", ["butterflies", "spiders"], 0),
]
TRAIN = [
    ("What color is the sky on a clear day?", ["blue", "green"], 0),
    ("Which one is a fruit?", ["carrot", "apple"], 1),
    ("How many days are in a week?", ["seven", "five"], 0),
    ("What do fish breathe with?", ["lungs", "gills"], 1),
]

MC_YAML = """task: parity_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: mc_train.jsonl
    test: mc_test.jsonl
output_type: multiple_choice
test_split: test
fewshot_split: train
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: options
doc_to_target: label
num_fewshot: 2
fewshot_config:
  sampler: default
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""

GEN_YAML = """task: parity_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: gen_test.jsonl
output_type: generate_until
test_split: test
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _reference_outputs(model_dir: Path, prompts: list[str]) -> list[str]:
    """Plain transformers greedy continuations (cut at the first stop string): a third implementation, used only
    to make half of the generation targets reachable, so exact match is 1 on some samples and 0 on others."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in ("\n", "Q:"):
            text = text.split(stop)[0]
        outs.append(text)
    return outs


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("parity_tasks")
    _jsonl(d / "mc_test.jsonl", [{"question": q, "options": o, "label": a} for q, o, a in QUESTIONS])
    _jsonl(d / "mc_train.jsonl", [{"question": q, "options": o, "label": a} for q, o, a in TRAIN])
    questions = [f"{a} + {b}" for a, b in [(2, 3), (10, 4), (3, 3), (7, 1), (6, 6), (9, 2)]]
    reachable = _reference_outputs(tiny_model_dir, [f"Q: {q}\nA:" for q in questions])
    # even documents: the answer a greedy decoder gives (exact match 1); odd: one it does not (exact match 0)
    answers = [out if i % 2 == 0 else "42" for i, out in enumerate(reachable)]
    assert all(a.strip() for a in answers[::2]), answers  # an empty target would make the comparison vacuous
    _jsonl(d / "gen_test.jsonl", [{"question": q, "answer": a} for q, a in zip(questions, answers)])
    (d / "mc.yaml").write_text(MC_YAML)
    (d / "gen.yaml").write_text(GEN_YAML)
    return d


def _lmeval_samples(tasks: Path, model_args: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict]]:
    """lm-eval's own per-sample log (`--log_samples`), offline, data files resolved from the task directory."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tasks)  # lm-eval resolves relative data_files from the working directory
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tasks / "hf_datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    out = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=["parity_mc", "parity_gen"],
                                  device="cpu", batch_size=BATCH, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)),
                                  gen_kwargs=f"max_gen_toks={MAX_NEW_TOKENS}")
    assert out is not None
    return {name: sorted(rows, key=lambda r: r["doc_id"]) for name, rows in out["samples"].items()}


@pytest.fixture(scope="module")
def lmeval_runs(tasks: Path, tiny_model_dir: Path, tiny_lora_dir: Path) -> dict[str, dict[str, list[dict]]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        base = f"pretrained={tiny_model_dir},dtype=float32"
        return {"base": _lmeval_samples(tasks, base, mp),
                "ft": _lmeval_samples(tasks, f"{base},peft={tiny_lora_dir}", mp)}


@pytest.fixture(scope="module")
def ours(tasks: Path, tiny_model_dir: Path, tiny_lora_dir: Path) -> dict[str, Any]:
    pair = load_pair(str(tiny_model_dir), adapter=tiny_lora_dir)
    cfg = EvalConfig(batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS)
    out = {}
    for name in ("mc", "gen"):
        conv = convert_task(tasks / f"{name}.yaml", "test")
        report = evaluate(pair, conv.samples, ["ft", "base"], cfg, progress=False)
        out[name] = (conv.samples, report.results)
    return out


@pytest.mark.parametrize("strategy", ["base", "ft"])
def test_multiple_choice_logliks_and_accuracy_match_lmeval(lmeval_runs, ours, strategy: str) -> None:
    theirs = lmeval_runs[strategy]["parity_mc"]
    samples, results = ours["mc"]
    assert len(theirs) == len(results) == len(QUESTIONS)
    worst = 0.0
    for row, sample, res in zip(theirs, samples, results):
        assert row["doc_id"] == sample.metadata["lmeval"]["doc_id"]
        # the same requests: context and continuation of every choice, byte for byte (few-shot draws included)
        assert [tuple(a[:2]) for a in row["arguments"]] == list(sample.contexts_and_continuations())
        out = res.outcomes[strategy]
        lls = [resp[0][0] for resp in row["resps"]]
        assert len(lls) == len(out.scores)
        for ours_ll, their_ll in zip(out.scores, lls):
            assert math.isfinite(ours_ll)
            worst = max(worst, abs(ours_ll - their_ll))
        assert bool(out.correct) == bool(row["acc"]), (row["doc_id"], out.scores, lls)
        assert bool(out.correct_norm) == bool(row["acc_norm"]), (row["doc_id"], out.scores, lls)
    assert worst <= 1e-4
    # the random model must make the comparison informative: some right, some wrong, acc_norm != acc somewhere
    accs = [bool(r["acc"]) for r in theirs]
    assert any(accs) and not all(accs)
    assert any(bool(r["acc"]) != bool(r["acc_norm"]) for r in theirs)


def test_lmeval_ran_the_adapter(lmeval_runs) -> None:
    """`peft=` reached lm-eval's model: its ft and base log-likelihoods differ (else ft parity proves nothing)."""
    ft, base = (lmeval_runs[k]["parity_mc"] for k in ("ft", "base"))
    diffs = [abs(a["resps"][i][0][0] - b["resps"][i][0][0]) for a, b in zip(ft, base) for i in range(len(a["resps"]))]
    assert max(diffs) > 0.1


@pytest.mark.parametrize("strategy", ["base", "ft"])
def test_generation_outputs_and_exact_match_match_lmeval(lmeval_runs, ours, strategy: str) -> None:
    theirs = lmeval_runs[strategy]["parity_gen"]
    samples, results = ours["gen"]
    assert len(theirs) == len(results) == 6
    for row, sample, res in zip(theirs, samples, results):
        assert row["arguments"][0][0] == sample.prompt
        out = res.outcomes[strategy]
        assert out.output == row["resps"][0][0] and out.output.strip(), row["doc_id"]
        assert bool(out.correct) == bool(row["exact_match"]), (row["doc_id"], out.output, row["target"])
    if strategy == "base":  # the targets were made reachable for the base model on even documents
        assert [bool(r["exact_match"]) for r in theirs] == [True, False] * 3
