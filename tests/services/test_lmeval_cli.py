"""lm-eval tasks through the real `tad` app (in-process): import, `--dataset lmeval:...` runs, `--lmeval` export."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.settings import get_settings
from tad_core.datasets.validate import dumps_jsonl
from tad_core.lmeval import convert_task

runner = CliRunner()
FIXTURES = Path(__file__).resolve().parents[1] / "data" / "lmeval"
SAMPLE_KEYS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
               "prompt_hash", "target_hash"}
RESULTS_KEYS = {"results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
                "git_hash", "date", "model_name", "model_name_sanitized", "tad"}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, tiny_lora_dir: Path) -> dict:
    monkeypatch.setenv("TAD_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("TAD_MODEL_ROOTS", f"{tiny_model_dir.parent.parent}:{tmp_path}")
    monkeypatch.delenv("TAD_SUBMIT_TOKEN", raising=False)
    get_settings.cache_clear()
    yield {"model": str(tiny_model_dir), "lora": str(tiny_lora_dir), "tmp": tmp_path}
    get_settings.cache_clear()


def _run(env: dict, yaml_name: str, *extra: str) -> dict:
    r = runner.invoke(app, ["run", "--dataset", f"lmeval:{FIXTURES / yaml_name}", "--split", "test", "--base",
                            env["model"], "--adapter", env["lora"], "--batch-size", "2", "-s", "ft", "-s",
                            "tad:alpha=1", "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def _export(env: dict, job_id: int, task: str) -> dict[str, tuple[dict, list[dict]]]:
    out = env["tmp"] / f"lmeval{job_id}"
    r = runner.invoke(app, ["results", str(job_id), "--lmeval", str(out)])
    assert r.exit_code == 0, r.output
    exported = {}
    for directory in sorted(p for p in out.iterdir()):
        [results] = directory.glob("results_*.json")
        [samples] = directory.glob(f"samples_{task}_*.jsonl")
        stamp = results.name[len("results_"):-len(".json")]  # lm-eval's date id: ISO time, ':' -> '-'
        assert samples.name == f"samples_{task}_{stamp}.jsonl" and ":" not in stamp and len(stamp) >= 19
        exported[directory.name] = (json.loads(results.read_text()),
                                    [json.loads(line) for line in samples.read_text().splitlines()])
    return exported


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_import_lmeval_writes_the_canonical_file(env: dict) -> None:
    out = env["tmp"] / "sci.jsonl"
    r = runner.invoke(app, ["data", "import-lmeval", str(FIXTURES / "science_mc.yaml"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == dumps_jsonl(convert_task(FIXTURES / "science_mc.yaml").samples)
    yaml_hash = hashlib.sha256((FIXTURES / "science_mc.yaml").read_bytes()).hexdigest()
    assert "4 samples of task tiny_science" in r.output and f"sha256={yaml_hash}" in r.output
    assert "science_base.yaml" in r.output  # the include is listed with its hash
    r = runner.invoke(app, ["data", "validate", str(out)])
    assert r.exit_code == 0 and "ok: 4 samples (mc)" in r.output


@pytest.mark.parametrize(("yaml_text", "key"), [
    ("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: x.jsonl}}\ndoc_to_text: q\n"
     "doc_to_target: a\nnot_a_key: 3\n", "not_a_key"),
    ("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: x.jsonl}}\ntest_split: test\n"
     "doc_to_target: a\n", "doc_to_text"),
    ("task: t\ndataset_path: super_glue\ndataset_name: boolq\ndoc_to_text: q\ndoc_to_target: a\n", "dataset_path"),
])
def test_bad_yaml_exits_2_naming_the_key(env: dict, yaml_text: str, key: str) -> None:
    path = env["tmp"] / "bad.yaml"
    path.write_text(yaml_text)
    out = env["tmp"] / "never.jsonl"
    r = runner.invoke(app, ["data", "import-lmeval", str(path), "--out", str(out)])
    assert r.exit_code == 2 and f"{key}:" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()
    r = runner.invoke(app, ["run", "--dataset", f"lmeval:{path}", "--split", "test", "--base", env["model"]])
    assert r.exit_code == 2 and f"{key}:" in r.output and "nothing was stored" in r.output, r.output
    assert json.loads(runner.invoke(app, ["jobs", "--json"]).stdout) == []


def test_mc_task_end_to_end_and_lmeval_export(env: dict) -> None:
    payload = _run(env, "science_mc.yaml")
    assert payload["job"]["status"] == "done" and payload["job"]["spec"]["dataset"] == "tiny_science"
    board = {row["label"] if "label" in row else row["key"]: row for row in payload["leaderboard"]}
    docs = [json.loads(line) for line in (FIXTURES / "science_test.jsonl").read_text().splitlines()]
    conv = convert_task(FIXTURES / "science_mc.yaml")
    exported = _export(env, payload["job"]["id"], "tiny_science")
    assert set(exported) == {"ft", "tad_alpha=1.0,beta=0.0"}
    for key, dirname in (("ft", "ft"), ("tad(alpha=1.0,beta=0.0)", "tad_alpha=1.0,beta=0.0")):
        results, records = exported[dirname]
        stored = payload["samples"][key]
        assert RESULTS_KEYS <= set(results)
        task = results["results"]["tiny_science"]
        assert task["acc,none"] == pytest.approx(board[key]["acc"])
        assert task["acc_norm,none"] == pytest.approx(board[key]["acc_norm"])
        assert task["acc_stderr,none"] == pytest.approx(board[key]["acc_stderr"])
        assert results["n-shot"] == {"tiny_science": 1} and results["versions"] == {"tiny_science": 1.0}
        assert results["higher_is_better"] == {"tiny_science": {"acc": True, "acc_norm": True}}
        assert results["n-samples"] == {"tiny_science": {"original": 4, "effective": 4}}
        assert results["configs"]["tiny_science"]["output_type"] == "multiple_choice"
        assert results["model_name"] == key and results["tad"]["job_id"] == payload["job"]["id"]
        assert len(records) == 4
        for i, (rec, row, doc, sample) in enumerate(zip(records, stored, docs, conv.samples)):
            assert set(rec) == SAMPLE_KEYS | {"acc", "acc_norm"}
            assert rec["doc_id"] == i and rec["doc"] == doc and rec["target"] == str(doc["label"])
            assert rec["arguments"] == {f"gen_args_{j}": {"arg_0": sample.prompt, "arg_1": " " + choice}
                                        for j, choice in enumerate(doc["options"])}
            # round trip of our values; a choice the strategy excluded (stored null) is -inf, written -Infinity
            scores = [float("-inf") if x == "-inf" else x for x in row["scores"]]
            assert [r[0][0] for r in rec["resps"]] == pytest.approx(scores)
            assert [r[0] for r in rec["filtered_resps"]] == pytest.approx(scores)
            assert all(r[1] is None for r in rec["filtered_resps"])  # is_greedy: not recorded, not invented
            assert rec["acc"] == float(row["correct"]) and rec["acc_norm"] == float(row["correct_norm"])
            assert rec["metrics"] == ["acc", "acc_norm"] and rec["filter"] == "none"
            assert rec["doc_hash"] == _sha(json.dumps(doc, indent=2, ensure_ascii=False))
            assert rec["prompt_hash"] == _sha(sample.prompt) and rec["target_hash"] == _sha(str(doc["label"]))
        assert task["acc,none"] == pytest.approx(sum(r["acc"] for r in records) / 4)
    # the two strategies' files pair up by task and doc_id, as two lm-eval runs' --log_samples do
    assert [r["doc_hash"] for r in exported["ft"][1]] == [r["doc_hash"] for r in exported["tad_alpha=1.0,beta=0.0"][1]]


def test_generation_task_end_to_end_and_lmeval_export(env: dict) -> None:
    payload = _run(env, "arith_gen.yaml", "--max-new-tokens", "6")
    assert payload["job"]["status"] == "done" and payload["job"]["spec"]["dataset"] == "tiny_arith"
    exported = _export(env, payload["job"]["id"], "tiny_arith")
    results, records = exported["ft"]
    stored = payload["samples"]["ft"]
    assert set(results["results"]["tiny_arith"]) == {"alias", "exact_match,number", "exact_match_stderr,number"}
    assert results["higher_is_better"] == {"tiny_arith": {"exact_match": True}}
    assert results["versions"] == {"tiny_arith": 2.0} and results["n-shot"] == {"tiny_arith": 0}
    for i, (rec, row) in enumerate(zip(records, stored, strict=True)):
        assert set(rec) == SAMPLE_KEYS | {"exact_match"}
        prompt, gen_kwargs = rec["arguments"]["gen_args_0"]["arg_0"], rec["arguments"]["gen_args_0"]["arg_1"]
        assert prompt == convert_task(FIXTURES / "arith_gen.yaml").samples[i].prompt
        assert gen_kwargs["until"] == ["\n", "Q:"] and gen_kwargs["max_gen_toks"] == 6 and gen_kwargs["do_sample"] is False
        assert rec["resps"] == [[row["output"]]]
        assert rec["filtered_resps"] == [row["extracted"] if row["extracted"] is not None else "[invalid]"]
        assert rec["exact_match"] == float(row["correct"]) and rec["filter"] == "number"
        assert rec["target"] == ["5", "6", "9"][i] and rec["target_hash"] == _sha(rec["target"])
        assert "\n" not in row["output"]  # the task's `until` reached the engine as a stop sequence


def test_results_export_options_are_exclusive(env: dict) -> None:
    r = runner.invoke(app, ["results", "1", "--csv", "--lmeval", str(env["tmp"] / "x")])
    assert r.exit_code == 2 and "one of --csv, --json, --lmeval" in r.output


def test_any_job_exports_a_plain_jsonl_dataset_as_its_own_task(env: dict) -> None:
    """A job on our own JSONL (not an lm-eval task) exports too: the canonical sample is the document."""
    from tests.services.helpers import write_mc_dataset

    data = write_mc_dataset(env["tmp"] / "colours.jsonl", 3)
    r = runner.invoke(app, ["run", "--dataset", str(data), "--base", env["model"], "--adapter", env["lora"],
                            "-s", "ft", "--json"])
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    results, records = _export(env, payload["job"]["id"], "colours")["ft"]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [rec["doc"] for rec in records] == rows and [rec["target"] for rec in records] == ["0", "1", "0"]
    assert [len(rec["arguments"]) for rec in records] == [2, 3, 4]
    assert results["n-shot"] == {"colours": 0} and results["results"]["colours"]["acc,none"] == pytest.approx(
        payload["leaderboard"][0]["acc"])


def test_suites_accept_lmeval_tasks_relative_to_the_suite() -> None:
    from services.suites import SuiteError, parse_suite

    suite = parse_suite({"name": "s", "version": 1, "strategies": ["ft"],
                         "datasets": [{"dataset": "lmeval:science_mc.yaml", "split": "test"}]}, base_dir=FIXTURES)
    assert suite.datasets[0].dataset == f"lmeval:{(FIXTURES / 'science_mc.yaml').resolve()}"
    with pytest.raises(SuiteError, match="does not exist"):
        parse_suite({"name": "s", "version": 1, "strategies": ["ft"], "datasets": ["lmeval:nowhere.yaml"]},
                    base_dir=FIXTURES)
