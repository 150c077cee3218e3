"""`tad results JOB --mlflow URI` against a real local MLflow tracking store (SQLite), read back with MLflow's own
client: one run per strategy, params, metrics, the per-sample artifact, idempotent re-export, clear refusals."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.settings import get_settings
from tests.services.helpers import write_mc_dataset

runner = CliRunner()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, tiny_lora_dir: Path) -> dict:
    monkeypatch.setenv("TAD_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("TAD_MODEL_ROOTS", f"{tiny_model_dir.parent.parent}:{tmp_path}")
    monkeypatch.delenv("TAD_SUBMIT_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts under ./mlruns
    get_settings.cache_clear()
    yield {"model": str(tiny_model_dir), "lora": str(tiny_lora_dir), "tmp": tmp_path,
           "uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    get_settings.cache_clear()


def _job(env: dict) -> dict:
    data = write_mc_dataset(env["tmp"] / "colours.jsonl", 5)
    r = runner.invoke(app, ["run", "--dataset", str(data), "--base", env["model"], "--adapter", env["lora"],
                            "--batch-size", "2", "-s", "ft", "-s", "base", "-s", "tad:alpha=1", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_one_mlflow_run_per_strategy_with_params_metrics_and_samples(env: dict) -> None:
    from mlflow.tracking import MlflowClient

    payload = _job(env)
    job_id = payload["job"]["id"]
    r = runner.invoke(app, ["results", str(job_id), "--mlflow", env["uri"], "--mlflow-experiment", "colours"])
    assert r.exit_code == 0, r.output
    client = MlflowClient(tracking_uri=env["uri"])
    experiment = client.get_experiment_by_name("colours")
    runs = {run.data.tags["tad.run_id"]: run for run in client.search_runs([experiment.experiment_id])}
    board = {str(row["run_id"]): row for row in payload["leaderboard"]}
    assert set(runs) == set(board) and len(runs) == 3
    from services.db import store
    from services.db.session import session_scope

    with session_scope(get_settings()) as s:
        adapter_sha = store.get_adapter(s, payload["job"]["adapter_id"]).sha256
    for run_id, run in runs.items():
        row = board[run_id]
        assert run.info.status == "FINISHED" and run.data.tags["tad.job_id"] == str(job_id)
        params, metrics = run.data.params, run.data.metrics
        assert params["strategy_key"] == row["key"] and params["strategy"] == row["strategy"]
        assert params["adapter_sha256"] == adapter_sha and len(adapter_sha) == 64
        assert params["dataset"] == "colours" and params["config.batch_size"] == "2"
        assert metrics["acc"] == pytest.approx(row["acc"]) and metrics["acc_norm"] == pytest.approx(row["acc_norm"])
        assert metrics["acc_stderr"] == pytest.approx(row["acc_stderr"]) and metrics["n"] == 5
        if row["key"] == "ft":
            assert "mcnemar_p_vs_ft" not in metrics
        else:
            assert metrics["mcnemar_p_vs_ft"] == pytest.approx(row["mcnemar_p"])
        if row["strategy"] == "tad":
            assert params["strategy.alpha"] == "1.0" and params["strategy.beta"] == "0.0"
        [artifact] = client.list_artifacts(run.info.run_id)
        assert artifact.path == "samples.csv"
        local = client.download_artifacts(run.info.run_id, "samples.csv", str(env["tmp"]))
        table = list(csv.DictReader(io.StringIO(Path(local).read_text())))
        stored = payload["samples"][row["key"]]
        assert [int(t["sample_index"]) for t in table] == [x["sample_index"] for x in stored] == list(range(5))
        assert [t["correct"] == "True" for t in table] == [bool(x["correct"]) for x in stored]
        assert [t["gold"] for t in table] == [str(i % 2) for i in range(5)]  # write_mc_dataset's answers

    # exporting again logs nothing new (same runs, same sample counts)
    again = runner.invoke(app, ["results", str(job_id), "--mlflow", env["uri"], "--mlflow-experiment", "colours"])
    assert again.exit_code == 0 and again.output.count("already logged") == 3, again.output
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_mlflow_refusals_exit_2_and_log_nothing(env: dict) -> None:
    from mlflow.tracking import MlflowClient

    r = runner.invoke(app, ["results", "99", "--mlflow", env["uri"]])
    assert r.exit_code == 2 and "99" in r.output
    r = runner.invoke(app, ["results", "1", "--csv", "--mlflow", env["uri"]])
    assert r.exit_code == 2 and "one of --csv, --json, --lmeval, --mlflow" in r.output
    assert MlflowClient(tracking_uri=env["uri"]).get_experiment_by_name("tad-eval") is None
