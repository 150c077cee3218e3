"""User dataset files through the real `tad` app: --split on multi-split files for run and train, --dataset-name,
.json arrays accepted or refused alike by `data validate` and `run` (exit 2), --shuffle-choices, data list --json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.settings import get_settings
from tad_core.datasets import REGISTRY, load_dataset

runner = CliRunner()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, tiny_lora_dir: Path) -> dict:
    monkeypatch.setenv("TAD_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("TAD_CACHE_DIR", str(tmp_path / "cache"))  # resolved user datasets are written there
    monkeypatch.setenv("TAD_MODEL_ROOTS", f"{tiny_model_dir.parent.parent}:{tmp_path}")
    monkeypatch.delenv("TAD_SUBMIT_TOKEN", raising=False)
    get_settings.cache_clear()
    yield {"model": str(tiny_model_dir), "lora": str(tiny_lora_dir), "tmp": tmp_path}
    get_settings.cache_clear()


def _rows(n: int, split: str | None = None, prefix: str = "q", answer: int = 2) -> list[dict]:
    return [{"id": f"{prefix}{i}", "prompt": f"Question {i}: pick one. Answer:", "choices": ["red", "green", "blue"],
             "answer": answer, **({"split": split} if split else {})} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(env: dict, dataset: str, *extra: str) -> dict:
    r = runner.invoke(app, ["run", "--dataset", dataset, "--base", env["model"], "--adapter", env["lora"],
                            "-s", "ft", "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_run_selects_the_split_of_a_multi_split_file_and_of_per_split_files(env: dict) -> None:
    f = _jsonl(env["tmp"] / "sciq.jsonl", _rows(3, "train", "t") + _rows(2, "val", "v"))
    val = _run(env, str(f), "--split", "val")
    assert val["job"]["n_samples"] == 2 and val["job"]["spec"]["dataset"] == "sciq"
    assert [r["sample_id"] for r in val["samples"]["ft"]] == ["v0", "v1"]
    train = _jsonl(env["tmp"] / "copa_train.jsonl", _rows(4, prefix="t"))
    dev = _jsonl(env["tmp"] / "copa_val.jsonl", _rows(3, prefix="v"))
    per_file = _run(env, f"copa={train},{dev}", "--split", "val")
    assert per_file["job"]["n_samples"] == 3 and per_file["job"]["spec"]["dataset"] == "copa"
    r = runner.invoke(app, ["run", "--dataset", str(f), "--split", "test", "--base", env["model"], "-s", "base"])
    assert r.exit_code == 2 and "no split 'test'" in r.output and "available: train, val" in r.output
    assert "nothing was stored" in r.output


def test_same_basename_gets_the_given_labels(env: dict) -> None:
    a = _jsonl(env["tmp"] / "sciq" / "test.jsonl", _rows(2))
    b = _jsonl(env["tmp"] / "csqa" / "test.jsonl", _rows(3, prefix="c"))
    ja = _run(env, str(a), "--dataset-name", "sciq", "--split", "test")
    jb = _run(env, f"csqa={b}", "--split", "test")
    assert ja["job"]["spec"]["dataset"] == "sciq" and jb["job"]["spec"]["dataset"] == "csqa"
    assert {row["dataset"] for row in ja["leaderboard"]} == {"sciq"}
    assert {row["dataset"] for row in jb["leaderboard"]} == {"csqa"}


def test_json_array_accepted_and_refused_alike_by_validate_and_run(env: dict) -> None:
    good = env["tmp"] / "colours.json"
    good.write_text(json.dumps(_rows(3), indent=1))
    v = runner.invoke(app, ["data", "validate", str(good)])
    assert v.exit_code == 0 and "ok: 3 samples" in v.output
    assert _run(env, str(good))["job"]["n_samples"] == 3
    bad = env["tmp"] / "broken.json"
    bad.write_text(json.dumps(_rows(2) + [{"id": "x", "prompt": "Q", "choices": ["a"], "answer": 0}]))
    v = runner.invoke(app, ["data", "validate", str(bad)])
    r = runner.invoke(app, ["run", "--dataset", str(bad), "--base", env["model"], "-s", "base"])
    assert v.exit_code == r.exit_code == 2
    message = "broken.json: item 3: field 'choices'"
    assert message in v.output and message in r.output, (v.output, r.output)
    assert len(json.loads(runner.invoke(app, ["jobs", "--json"]).stdout)) == 1  # the good run's job only
    # a bad .jsonl: the same exit code from both commands
    badl = _jsonl(env["tmp"] / "broken.jsonl", [{"id": "x", "prompt": "Q", "choices": ["a", "b"], "answer": 5}])
    v = runner.invoke(app, ["data", "validate", str(badl)])
    r = runner.invoke(app, ["run", "--dataset", str(badl), "--base", env["model"], "-s", "base"])
    assert v.exit_code == r.exit_code == 2
    assert "line 1: field 'answer'" in v.output and "line 1: field 'answer'" in r.output


def test_data_validate_reports_splits(env: dict) -> None:
    f = _jsonl(env["tmp"] / "s.jsonl", _rows(3, "train", "t") + _rows(1, "val", "v"))
    r = runner.invoke(app, ["data", "validate", str(f)])
    assert r.exit_code == 0 and "splits: train 3, val 1" in r.output


def test_shuffle_choices_moves_the_gold_and_labels_the_dataset(env: dict) -> None:
    f = _jsonl(env["tmp"] / "lastgold.jsonl", _rows(12))  # gold always last, as OLMo's SciQ
    job = _run(env, str(f), "--shuffle-choices", "7")
    assert job["job"]["spec"]["dataset"] == "lastgold+shuffle7"
    expected = load_dataset(str(f), "val", shuffle_choices=7).samples
    assert len({s.answer for s in expected}) > 1
    for row, sample in zip(job["samples"]["ft"], expected):
        assert row["sample_id"] == sample.id and len(row["scores"]) == 3
        assert bool(row["correct"]) == (row["pred"] == sample.answer)


def test_train_takes_the_split_of_a_multi_split_file(env: dict) -> None:
    f = _jsonl(env["tmp"] / "sciq.jsonl", _rows(3, "train", "t") + _rows(2, "val", "v"))
    out = env["tmp"] / "adapter"
    r = runner.invoke(app, ["train", "--dataset", str(f), "--split", "train", "--base", env["model"], "--steps", "1",
                            "--train-size", "3", "--batch-size", "3", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "tad_manifest.json").read_text())
    assert manifest["dataset"] == "sciq"
    assert manifest["dataset_content_hash"] == load_dataset(str(f), "train").content_hash
    assert manifest["dataset_content_hash"] != load_dataset(str(f), "val").content_hash


def test_data_list_json(env: dict) -> None:
    r = runner.invoke(app, ["data", "list", "--json"])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.stdout)
    assert [d["name"] for d in listed] == list(REGISTRY)
    arc = next(d for d in listed if d["name"] == "arc_easy")
    assert arc["splits"]["val"] == 570 and arc["task_type"] == "mc" and isinstance(arc["fetched"], bool)


def test_exports_carry_the_gold_answer_and_spell_minus_inf(env: dict) -> None:
    import csv
    import io

    mc = _jsonl(env["tmp"] / "mc.jsonl", [{**r, "answer": i % 3} for i, r in enumerate(_rows(6))])
    job = _run(env, str(mc), "-s", "contrastive:beta=0.9")
    job_id = job["job"]["id"]
    for key, rows in job["samples"].items():
        assert [r["gold"] for r in rows] == [i % 3 for i in range(6)]
        assert all(x == "-inf" or isinstance(x, float) for r in rows for x in r["scores"]), key
    # the plausibility head (beta 0.9) excludes tokens: those choices are spelled -inf, not null
    contrastive = next(k for k in job["samples"] if k.startswith("contrastive"))
    assert any(x == "-inf" for r in job["samples"][contrastive] for x in r["scores"])
    r = runner.invoke(app, ["results", str(job_id), "--csv"])
    assert r.exit_code == 0, r.output
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [t["gold"] for t in table if t["strategy"] == "ft"] == [str(i % 3) for i in range(6)]
    assert any('"-inf"' in t["scores"] for t in table) and not any("null" in t["scores"] for t in table)
    gen = _jsonl(env["tmp"] / "gen.jsonl", [{"id": f"g{i}", "prompt": f"{i}+1=", "reference": str(i + 1)}
                                            for i in range(3)])
    gjob = _run(env, str(gen), "--max-new-tokens", "2")
    assert [r["gold"] for r in gjob["samples"]["ft"]] == ["1", "2", "3"]


def test_export_row_spells_minus_inf_and_keeps_finite_scores() -> None:
    from services.export import SAMPLE_CSV_COLUMNS, export_row, sample_csv_cells

    row = {c: None for c in SAMPLE_CSV_COLUMNS[1:-1]} | {"scores": [-1.5, None], "kv": {}}
    out = export_row(row, 1)
    assert out["scores"] == [-1.5, "-inf"] and out["gold"] == 1 and row["scores"] == [-1.5, None]
    cells = dict(zip(SAMPLE_CSV_COLUMNS, sample_csv_cells("ft", row)))
    assert cells["scores"] == '[-1.5, "-inf"]' and cells["gold"] is None


def test_validate_and_run_apply_the_deployments_limits_alike(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`data validate` used the validator's own defaults (20,000 chars a field) while `run` used the settings
    (32,768): a file validate refused ran, and TAD_MAX_SAMPLE_CHARS did not reach validate at all."""
    long = _jsonl(env["tmp"] / "long.jsonl", [{**_rows(1)[0], "prompt": "word " * 5_000 + "Answer:"}])
    v = runner.invoke(app, ["data", "validate", str(long)])
    assert v.exit_code == 0 and "ok: 1 samples" in v.output, v.output
    monkeypatch.setenv("TAD_MAX_SAMPLE_CHARS", "1000")
    get_settings.cache_clear()
    v = runner.invoke(app, ["data", "validate", str(long)])
    r = runner.invoke(app, ["run", "--dataset", f"long={long}", "--base", env["model"], "-s", "base"])
    assert v.exit_code == r.exit_code == 2, (v.output, r.output)
    message = "long.jsonl: line 1: field 'prompt'"
    assert message in v.output and message in r.output and "1000" in v.output, (v.output, r.output)
    assert json.loads(runner.invoke(app, ["jobs", "--json"]).stdout) == []  # nothing stored
