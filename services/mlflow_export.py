"""`tad results JOB --mlflow URI`: a job's runs logged to an MLflow tracking server, one MLflow run per strategy.

Teams keep their experiment history in a tracking server; this puts each strategy of a job beside their other
runs: params (the strategy spec, the generation/evaluation config, the adapter's sha256, base model, dataset and
its content hash), metrics (acc, acc_norm, their stderr, McNemar p vs ft raw and Holm-adjusted, fixed/broken,
n), and the per-sample table (`tad results --csv` for that run) as the artifact `samples.csv`. Each MLflow run is
tagged with the job and run ids; exporting the same job again skips the runs already logged with the same number
of samples, so a re-export after a crash neither duplicates nor loses runs.

Needs the optional extra `tad-eval[mlflow]` (the `mlflow-skinny` client, enough for file-store, SQLite and HTTP
tracking URIs). Artifacts go where the experiment's artifact location says (MLflow's default: `./mlruns` for a
new experiment on a local URI).
"""
from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.db import store
from services.db.session import session_scope
from services.export import SAMPLE_CSV_COLUMNS, iter_sample_rows, sample_csv_cells
from services.settings import Settings

DEFAULT_EXPERIMENT = "tad-eval"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (longer values are cut and say so)
TAG_JOB = "tad.job_id"
TAG_RUN = "tad.run_id"
TAG_N = "tad.samples"


class MlflowExportError(ValueError):
    """A job that cannot be logged (or no MLflow client installed); the message says what to do."""


@dataclass(frozen=True)
class LoggedRun:
    """One strategy of the job and the MLflow run that holds it (`skipped`: it was already there)."""

    key: str
    mlflow_run_id: str
    skipped: bool


def _client(tracking_uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise MlflowExportError("--mlflow needs the MLflow client: pip install 'tad-eval[mlflow]'") from None
    with _named(tracking_uri):  # an unknown scheme fails here
        return MlflowClient(tracking_uri=tracking_uri)


@contextmanager
def _named(tracking_uri: str) -> Iterator[None]:
    """MLflow's errors about the tracking URI (unknown scheme, unreachable server) as an MlflowExportError naming
    `--mlflow URI`, not a traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlflowExportError(f"--mlflow {tracking_uri}: {first}") from None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 12] + "...[cut]"


def run_params(row: store.LeaderboardRow, job: store.JobInfo, dataset: store.DatasetInfo,
               adapter: store.AdapterInfo | None) -> dict[str, str]:
    """The MLflow params of one strategy's run: what identifies it (spec, config, weights, data)."""
    spec = job.spec
    params: dict[str, Any] = {
        "strategy": row.strategy, "strategy_key": row.key, "variant": row.variant or "",
        "base": spec.get("base"), "adapter": row.adapter or "",
        "adapter_sha256": adapter.sha256 if adapter else "", "finetuned": spec.get("finetuned") or "",
        "dataset": dataset.name, "split": dataset.split, "dataset_content_hash": dataset.content_hash,
        "dataset_source": dataset.source, "limit": spec.get("limit"),
    }
    params.update({f"strategy.{k}": v for k, v in sorted(row.params.items())})
    params.update({f"config.{k}": v for k, v in sorted((spec.get("config") or {}).items())})
    params.update({f"info.{k}": v for k, v in sorted(row.info.items())})
    return {k: _param_value(v) for k, v in params.items() if v is not None}


def run_metrics(row: store.LeaderboardRow) -> dict[str, float]:
    """The MLflow metrics of one strategy's run; absent values (no acc_norm for generation, no McNemar for ft)
    are left out, not logged as NaN."""
    values = {"acc": row.acc, "acc_stderr": row.acc_stderr, "acc_norm": row.acc_norm,
              "acc_norm_stderr": row.acc_norm_stderr, "mcnemar_p_vs_ft": row.mcnemar_p,
              "mcnemar_p_vs_ft_holm": row.mcnemar_p_holm, "fixed_vs_ft": row.fixed, "broken_vs_ft": row.broken,
              "n": row.n}
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def _write_samples_csv(settings: Settings, row: store.LeaderboardRow, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SAMPLE_CSV_COLUMNS)
        for key, sample_row in iter_sample_rows(settings, [(row.key, row.run_id)]):
            writer.writerow(sample_csv_cells(key, sample_row))


def _existing(client: Any, experiment_id: str, row: store.LeaderboardRow) -> str | None:
    found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_RUN}` = '{row.run_id}' and "
                                                              f"tags.`{TAG_N}` = '{row.n}'", max_results=1)
    return found[0].info.run_id if found else None


def export_job_mlflow(settings: Settings, job_id: int, tracking_uri: str,
                      experiment: str = DEFAULT_EXPERIMENT) -> list[LoggedRun]:
    """Log every strategy of `job_id` as one MLflow run in `experiment` (created if missing) at `tracking_uri`.

    Raises store.NotFound for an unknown job and MlflowExportError when there is nothing to log or no client."""
    from mlflow.entities import Metric, Param, RunTag

    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        dataset = store.get_dataset(s, job.dataset_id)
        adapter = store.get_adapter(s, job.adapter_id) if job.adapter_id else None
        board = store.leaderboard(s, job_ids=[job_id])
    if not board:
        raise MlflowExportError(f"job {job_id} has no runs to log yet")
    client = _client(tracking_uri)
    with _named(tracking_uri):  # the first call that reaches the store
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    logged = []
    for row in board:
        existing = _existing(client, experiment_id, row)
        if existing:
            logged.append(LoggedRun(row.label, existing, True))
            continue
        tags = {TAG_JOB: str(job_id), TAG_RUN: str(row.run_id), TAG_N: str(row.n), "tad.job_status": job.status}
        run = client.create_run(experiment_id, run_name=f"job{job_id} {row.label}", tags=tags)
        rid = run.info.run_id
        now_ms = int(time.time() * 1000)
        client.log_batch(rid, params=[Param(k, v) for k, v in run_params(row, job, dataset, adapter).items()],
                         metrics=[Metric(k, v, now_ms, 0) for k, v in run_metrics(row).items()],
                         tags=[RunTag("mlflow.note.content", f"TaD-Eval job {job_id}, strategy {row.label}")])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "samples.csv"
            _write_samples_csv(settings, row, path)
            client.log_artifact(rid, str(path))
        client.set_terminated(rid)
        logged.append(LoggedRun(row.label, rid, False))
    return logged
