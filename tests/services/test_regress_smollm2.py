"""Regression gate on the real embedded model: two LoRA adapters trained on SmolLM2-135M with different train
sizes (data-scarce: 50 vs 500 ARC-Easy samples), registered, promoted and gated on a small suite.

The statistics are checked independently from the stored per-sample results (see test_regress.py). The exit-1
case uses a third adapter that learnt 16 training samples and a diverged copy of it (its LoRA B matrices scaled
up, as a training run that blew up would leave it), gated on those 16 samples: the copy's accuracy collapses and
the gate must say so at the default alpha and minimum effect. (A diverged copy of the 50-sample adapter on 40
validation or training samples was tried first: 0.50 -> 0.30, p = 0.077 at n = 40, not a dependable failure.)
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.db import store
from services.db.session import session_scope
from services.settings import Settings, get_settings
from tests.services.test_regress import _check_rows_independently

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

runner = CliRunner()
STEPS, BATCH = 25, 4
SUITE = """\
name: arc-gate
version: 1
datasets:
  - {dataset: arc_easy, split: val, limit: 40}
strategies: [ft, "tad:alpha=1"]
config: {batch_size: 8}
"""
DIVERGE = 30.0  # scale of the diverged adapter's LoRA B matrices


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """LoRA adapters on SmolLM2 trained on 50 and on 500 ARC-Easy train samples (same steps, seed, batch)."""
    from tad_core.train import TrainConfig, train_adapter

    out = tmp_path_factory.mktemp("gate_adapters")
    for n in (50, 500):
        train_adapter(TrainConfig(out=out / f"lora_{n}", dataset="arc_easy", method="lora", steps=STEPS,
                                  train_size=n, batch_size=BATCH, seed=0), progress=False)
    return {n: out / f"lora_{n}" for n in (50, 500)}


@pytest.fixture(scope="module")
def family(trained: dict[int, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An embedded SQLite DB with arc:1 (50 samples, promoted), arc:2 (500 samples) and suite arc-gate:1."""
    tmp = tmp_path_factory.mktemp("gate_db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAD_DATABASE_URL", f"sqlite:///{tmp / 'tad.db'}")
        mp.setenv("TAD_MODEL_ROOTS", f"{trained[50].parent}:{tmp}")
        mp.delenv("TAD_SUBMIT_TOKEN", raising=False)
        get_settings.cache_clear()
        out = _ok(["adapters", "register", "arc", str(trained[50])])
        assert "registered arc:1" in out and "trained on 50 arc_easy:train samples" in out
        assert "base smollm2-135m-instruct" in out  # from tad_manifest.json
        _ok(["adapters", "promote", "arc:1"])
        assert "trained on 500 arc_easy:train samples" in _ok(["adapters", "register", "arc", str(trained[500]),
                                                               "--base", "smollm2-135m-instruct"])
        (tmp / "suite.yaml").write_text(SUITE)
        _ok(["suites", "add", str(tmp / "suite.yaml")])
        yield {"settings": Settings(), "tmp": tmp, "trained": trained}
    get_settings.cache_clear()


def _ok(argv: list[str], code: int = 0) -> str:
    r = runner.invoke(app, argv)
    assert r.exit_code == code, (argv, r.output)
    return r.output


def _gate(argv: list[str]) -> tuple[int, dict]:
    r = runner.invoke(app, ["regress", *argv, "--json"])
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout.strip().splitlines()[-1])


def _rows(settings: Settings) -> int:
    with session_scope(settings) as s:
        return store.count_sample_rows(s, [r for j in store.list_jobs(s, limit=1000)
                                           for r in [x.id for x in store.job_runs(s, j.id)]])


@pytest.fixture(scope="module")
def first_gate(family: dict) -> tuple[int, dict]:
    return _gate(["arc:2", "--suite", "arc-gate"])


def test_gate_500_vs_50_samples(family: dict, first_gate: tuple[int, dict]) -> None:
    code, payload = first_gate
    assert (payload["candidate"], payload["baseline"], payload["suite"]) == ("arc:2", "arc:1", "arc-gate:1")
    assert len(payload["jobs_run"]) == 2
    assert [(r["dataset"], r["strategy"], r["n"]) for r in payload["rows"]] == [
        ("arc_easy", "ft", 40), ("arc_easy", "tad(alpha=1.0,beta=0.0)", 40)]
    _check_rows_independently(family["settings"], payload)
    assert code == payload["exit_code"]
    out = _ok(["regress", "arc:2", "--suite", "arc-gate"], code)  # reused: the same table, nothing recomputed
    assert "(reused)" in out and ("PASSED" in out) == (code == 0)


def test_identical_weights_unchanged_with_reused_runs(family: dict, first_gate: tuple[int, dict]) -> None:
    same = family["tmp"] / "lora_50_again"
    shutil.copytree(family["trained"][50], same)
    assert "already has these weights" in _ok(["adapters", "register", "arc", str(same)])
    assert "same weights are registered as arc:1" in _ok(["adapters", "register", "arc", str(same), "--version",
                                                          "3"])
    before = _rows(family["settings"])
    code, payload = _gate(["arc:3", "--suite", "arc-gate"])
    assert code == 0 and payload["jobs_run"] == []
    for row in payload["rows"]:
        assert row["verdict"] == "unchanged" and row["diff"] == 0 and row["p_value"] == 1.0
        assert row["candidate_reused"] and row["candidate_run_id"] == row["baseline_run_id"]
    assert _rows(family["settings"]) == before  # no sample row computed


@pytest.fixture(scope="module")
def memo_family(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """memo:1 (promoted): a LoRA that learnt 16 ARC-Easy train samples (10 epochs); memo:2: a diverged copy of it
    (LoRA B matrices x DIVERGE, as a training run that blew up leaves them); suite memory-probe:1 = those 16
    samples, strategy ft. A separate embedded DB."""
    from safetensors.torch import load_file, save_file
    from tad_core.datasets import load_dataset
    from tad_core.train import TrainConfig, select_samples, train_adapter

    tmp = tmp_path_factory.mktemp("memo")
    probe = tmp / "probe.jsonl"
    seen = select_samples(load_dataset("arc_easy", "train").samples, 16, 0)
    probe.write_text("".join(json.dumps(x.to_dict()) + "\n" for x in seen))
    train_adapter(TrainConfig(out=tmp / "memo", dataset=str(probe), split="train", method="lora", steps=40,
                              train_size=16, batch_size=BATCH, seed=0), progress=False)
    bad = tmp / "memo_diverged"
    shutil.copytree(tmp / "memo", bad)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k: v * DIVERGE if ".lora_B." in k else v for k, v in weights.items()},
              str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    (bad / "tad_manifest.json").unlink()  # the manifest describes the trained weights, not these
    (tmp / "memory.yaml").write_text("name: memory-probe\nversion: 1\n"
                                     "datasets: [{dataset: probe.jsonl, split: train}]\nstrategies: [ft]\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TAD_DATABASE_URL", f"sqlite:///{tmp / 'tad.db'}")
        mp.setenv("TAD_MODEL_ROOTS", str(tmp))
        mp.delenv("TAD_SUBMIT_TOKEN", raising=False)
        get_settings.cache_clear()
        _ok(["adapters", "register", "memo", str(tmp / "memo")])
        _ok(["adapters", "promote", "memo:1"])
        _ok(["adapters", "register", "memo", str(bad)])
        _ok(["suites", "add", str(tmp / "memory.yaml")])
        yield {"settings": Settings(), "tmp": tmp}
    get_settings.cache_clear()


def test_diverged_adapter_regresses_exit_1(memo_family: dict) -> None:
    """The diverged copy forgets what memo:1 learnt: the gate reports it at the default alpha and min effect."""
    code, payload = _gate(["memo:2", "--suite", "memory-probe"])
    _check_rows_independently(memo_family["settings"], payload)
    (ft,) = payload["rows"]
    assert ft["verdict"] == "regressed" and ft["p_value"] < 0.05 and ft["diff"] < -0.01, ft
    assert code == 1 and payload["exit_code"] == 1 and len(payload["jobs_run"]) == 2
    out = _ok(["regress", "memo:2", "--suite", "memory-probe"], 1)
    assert "REGRESSED" in out and "(reused)" in out
