"""SVDecode (mu=auto) and DoLa through planning and the shard function (embedded mode, tiny model, SQLite)."""
from __future__ import annotations

from pathlib import Path

import pytest

from services.db import store
from services.db.schema import upgrade
from services.db.session import session_scope
from services.planning import plan_job
from services.shard_runner import run_job_embedded
from services.submit_request import SubmissionError, SubmitRequest
from tad_core.calibration import load_calibration
from tests.services.helpers import make_settings, write_mc_dataset


def test_svdecode_auto_is_calibrated_once_and_recorded_on_the_run(sqlite_url, tiny_model_dir: Path,
                                                                  tiny_lora_dir: Path, tmp_path: Path):
    upgrade(sqlite_url)
    settings = make_settings(sqlite_url, [tiny_model_dir.parent.parent, tmp_path])
    strategies = ["ft", "dola:layers=high", "svdecode:mu=auto"]
    custom = write_mc_dataset(tmp_path / "d.jsonl", 4)
    with pytest.raises(SubmissionError, match="train split"):  # a custom file has no train split to calibrate on
        plan_job(SubmitRequest(dataset=str(custom), base=str(tiny_model_dir), adapter=str(tiny_lora_dir),
                               strategies=strategies), settings)
    plan = plan_job(SubmitRequest(dataset="arc_easy", base=str(tiny_model_dir), adapter=str(tiny_lora_dir),
                                  strategies=strategies, limit=4, shard_size=2, config={"batch_size": 2}), settings)
    assert [r.key for r in plan.runs] == ["ft", "dola(layers=high,repetition_penalty=1.2)",
                                          "svdecode(beta=0.1,mu=auto)"]
    info = run_job_embedded(plan.job.id, settings)
    assert info.status == "done" and info.shards_done == 2
    with session_scope(settings) as s:
        runs = {r.key: r for r in store.job_runs(s, plan.job.id)}
        sv = runs["svdecode(beta=0.1,mu=auto)"]
        stored = load_calibration(sv.info["calibration"])
        assert stored is not None and stored.dataset == "arc_easy" and stored.split == "train"
        assert sv.info["mu"] == float(f"{stored.mu:.6g}") and sv.info["calibration_n_samples"] == 128
        assert store.count_sample_rows(s, [r.id for r in runs.values()]) == 4 * 3
        board = {r.key: r for r in store.leaderboard(s, job_ids=[plan.job.id])}
        assert board[sv.key].info["mu"] == sv.info["mu"] and board[sv.key].n == 4


def test_calibration_samples_setting_sizes_svdecode_calibration(sqlite_url, tiny_model_dir: Path,
                                                                 tiny_lora_dir: Path, tmp_path: Path):
    """TAD_CALIBRATION_SAMPLES: mu calibrated on that many train samples, recorded with the run (own cache key)."""
    upgrade(sqlite_url)
    settings = make_settings(sqlite_url, [tiny_model_dir.parent.parent, tmp_path], calibration_samples=6)
    plan = plan_job(SubmitRequest(dataset="arc_easy", base=str(tiny_model_dir), adapter=str(tiny_lora_dir),
                                  strategies=["ft", "svdecode:mu=auto"], limit=2, config={"batch_size": 2}), settings)
    assert run_job_embedded(plan.job.id, settings).status == "done"
    with session_scope(settings) as s:
        sv = next(r for r in store.job_runs(s, plan.job.id) if r.strategy == "svdecode")
    assert sv.info["calibration_n_samples"] == 6 and load_calibration(sv.info["calibration"]).n_samples == 6
