"""Store functions: every read and write the services do, as functions of a Session.

They return plain (frozen) dataclasses so callers never hold ORM objects past a session, and they never commit:
the caller's `session_scope()` decides. Writes that can be repeated (a redelivered shard) are idempotent.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from tad_core.metrics import mcnemar_p

from services.db.models import (
    Adapter,
    BaseModel,
    Dataset,
    DatasetSample,
    Job,
    RegressionCheck,
    Run,
    RunAggregate,
    SampleResult,
    Shard,
    Suite,
    WorkerHeartbeat,
    utcnow,
)

TERMINAL_JOB = ("done", "failed", "partial", "cancelled")
RESULT_COLUMNS = ("sample_id", "output", "extracted", "pred", "pred_norm", "scores", "correct", "correct_norm",
                  "flip_rate", "vs_ft", "tie", "latency_s", "tokens", "kv", "error")


class NotFound(LookupError):
    """A job, run, adapter or dataset id/name that does not exist."""


# ---------------------------------------------------------------------------------------------------------------
# Plain result types


@dataclass(frozen=True)
class BaseModelInfo:
    id: int
    name: str
    path: str
    sha256: str | None
    licence: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    id: int
    name: str
    version: int
    path: str
    method: str
    sha256: str
    base_model_id: int
    base_model: str
    manifest: dict[str, Any]
    promoted: bool
    created_at: datetime

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class DatasetInfo:
    id: int
    name: str
    version: int
    split: str
    content_hash: str
    task_type: str
    n_rows: int
    source: str


@dataclass(frozen=True)
class RunSpec:
    """A run to create: one strategy spec of a job."""

    strategy: str
    params: dict[str, Any]
    key: str
    run_hash: str


@dataclass(frozen=True)
class RunInfo:
    id: int
    job_id: int
    strategy: str
    params: dict[str, Any]
    key: str
    run_hash: str
    info: dict[str, Any]


@dataclass(frozen=True)
class ShardInfo:
    id: int
    job_id: int
    start: int
    stop: int
    status: str
    attempts: int
    samples_done: int
    error: str | None
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class JobInfo:
    id: int
    status: str
    submitted_by: str
    created_at: datetime
    spec: dict[str, Any]
    dataset_id: int
    adapter_id: int | None
    base_model_id: int
    cancel_requested: bool
    n_samples: int
    n_shards: int
    shards_done: int
    shards_failed: int
    samples_done: int
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    owner_id: int | None = None  # the API user who submitted it (services.db.users)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_JOB

    @property
    def fraction(self) -> float:
        return self.samples_done / self.n_samples if self.n_samples else 1.0


@dataclass(frozen=True)
class ShardClaim:
    """What a worker should do with a delivered shard: `run` it, or skip it (`done`, `failed`, `cancelled`)."""

    action: str
    shard: ShardInfo


@dataclass(frozen=True)
class LeaderboardRow:
    job_id: int
    run_id: int
    job_status: str
    dataset: str
    split: str
    base: str
    adapter: str | None
    strategy: str
    key: str
    params: dict[str, Any]
    n: int
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    fixed: int | None
    broken: int | None
    mcnemar_p: float | None
    metrics: dict[str, float | None] = field(default_factory=dict)
    mcnemar_p_holm: float | None = None  # Holm-adjusted over the job's comparisons with ft (tad_core.metrics.holm)
    info: dict[str, Any] = field(default_factory=dict)  # values fixed at run time (e.g. SVDecode's calibrated mu)
    variant: str = ""  # scoring settings that change results for the same strategy key (see scoring_variant)

    @property
    def label(self) -> str:
        return with_variant(self.key, self.variant)


@dataclass(frozen=True)
class DiffRow:
    sample_index: int
    sample_id: str
    a_correct: bool | None
    b_correct: bool | None
    a_pred: int | None
    b_pred: int | None
    a_output: str | None
    b_output: str | None


@dataclass(frozen=True)
class RunDiff:
    run_a: int
    run_b: int
    both_right: int
    a_only: int  # a right, b wrong
    b_only: int  # b right, a wrong
    both_wrong: int
    rows: list[DiffRow]


@dataclass(frozen=True)
class SuiteInfo:
    id: int
    name: str
    version: int
    spec: dict[str, Any]
    sha256: str
    source: str
    created_at: datetime

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class RegressionCheckInfo:
    id: int
    suite_id: int
    suite: str  # name:version
    candidate_id: int
    candidate: str  # name:version
    baseline_id: int
    baseline: str
    alpha: float
    min_effect: float
    verdict: str  # passed | regressed
    rows: list[dict[str, Any]]
    created_at: datetime


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    pid: int
    started_at: datetime
    last_seen: datetime
    job_id: int | None
    shard_id: int | None


# ---------------------------------------------------------------------------------------------------------------
# Converters


def _base_info(m: BaseModel) -> BaseModelInfo:
    return BaseModelInfo(m.id, m.name, m.path, m.sha256, m.licence)


def _adapter_info(a: Adapter, base_name: str) -> AdapterInfo:
    return AdapterInfo(a.id, a.name, a.version, a.path, a.method, a.sha256, a.base_model_id, base_name,
                       dict(a.manifest or {}), bool(a.promoted), a.created_at)


def _dataset_info(d: Dataset) -> DatasetInfo:
    return DatasetInfo(d.id, d.name, d.version, d.split, d.content_hash, d.task_type, d.n_rows, d.source)


def _run_info(r: Run) -> RunInfo:
    return RunInfo(r.id, r.job_id, r.strategy, dict(r.params or {}), r.key, r.run_hash, dict(r.info or {}))


def _shard_info(s: Shard) -> ShardInfo:
    return ShardInfo(s.id, s.job_id, s.start, s.stop, s.status, s.attempts, s.samples_done, s.error, s.worker,
                     s.started_at, s.finished_at)


def _job_info(j: Job) -> JobInfo:
    return JobInfo(j.id, j.status, j.submitted_by, j.created_at, dict(j.spec), j.dataset_id, j.adapter_id,
                   j.base_model_id, bool(j.cancel_requested), j.n_samples, j.n_shards, j.shards_done,
                   j.shards_failed, j.samples_done, j.error, j.started_at, j.finished_at, j.owner_id)


def _dialect_insert(session: Session, table: Any) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"upserts are implemented for Postgres and SQLite, not {name}")


def _locked(session: Session, stmt: Any) -> Any:
    """SELECT ... FOR UPDATE where the dialect has it (SQLite serialises writers anyway)."""
    return stmt.with_for_update() if session.get_bind().dialect.name == "postgresql" else stmt


# ---------------------------------------------------------------------------------------------------------------
# Models, adapters, datasets


def get_base_model(session: Session, base_model_id: int) -> BaseModelInfo:
    row = session.get(BaseModel, base_model_id)
    if row is None:
        raise NotFound(f"base model {base_model_id} does not exist")
    return _base_info(row)


def get_or_create_base_model(session: Session, name: str, path: str, sha256: str | None = None,
                             licence: str | None = None) -> BaseModelInfo:
    """The base model row for `name`, created on first use; a sha256 or licence learnt later is filled in."""
    row = session.scalar(select(BaseModel).where(BaseModel.name == name))
    if row is None:
        row = BaseModel(name=name, path=path, sha256=sha256, licence=licence)
        session.add(row)
        session.flush()
    else:
        if sha256 and not row.sha256:
            row.sha256 = sha256
        if licence and not row.licence:
            row.licence = licence
    return _base_info(row)


def register_adapter(
    session: Session,
    *,
    name: str,
    path: str,
    method: str,
    sha256: str,
    base_model_id: int,
    manifest: dict[str, Any] | None = None,
    version: int | None = None,
) -> tuple[AdapterInfo, bool]:
    """Register a version of adapter `name`; identical weights (same name and sha256) return the existing one.

    Returns (adapter, created). The version is auto-incremented unless given; a given version that exists with
    other weights raises ValueError.
    """
    base_name = session.scalar(select(BaseModel.name).where(BaseModel.id == base_model_id))
    if base_name is None:
        raise NotFound(f"base model id {base_model_id} does not exist")
    same = session.scalar(select(Adapter).where(Adapter.name == name, Adapter.sha256 == sha256)
                          .order_by(Adapter.version.desc()))
    if same is not None and (version is None or version == same.version):
        return _adapter_info(same, base_name), False
    if version is None:
        version = (session.scalar(select(func.max(Adapter.version)).where(Adapter.name == name)) or 0) + 1
    elif session.scalar(select(Adapter.id).where(Adapter.name == name, Adapter.version == version)) is not None:
        raise ValueError(f"adapter {name}:{version} already exists with other weights")
    row = Adapter(name=name, version=version, path=path, method=method, sha256=sha256, base_model_id=base_model_id,
                  manifest=manifest or {}, promoted=False)
    session.add(row)
    session.flush()
    return _adapter_info(row, base_name), True


def find_adapter(session: Session, name: str, version: int | None = None) -> AdapterInfo | None:
    """Adapter `name` at `version`, or its latest version when `version` is None."""
    stmt = select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id).where(Adapter.name == name)
    stmt = stmt.where(Adapter.version == version) if version is not None else stmt.order_by(Adapter.version.desc())
    row = session.execute(stmt.limit(1)).first()
    return _adapter_info(row[0], row[1]) if row else None


def get_adapter(session: Session, adapter_id: int) -> AdapterInfo:
    row = session.execute(select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id)
                          .where(Adapter.id == adapter_id)).first()
    if row is None:
        raise NotFound(f"adapter id {adapter_id} does not exist")
    return _adapter_info(row[0], row[1])


def list_adapters(session: Session, name: str | None = None) -> list[AdapterInfo]:
    stmt = select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id)
    if name is not None:
        stmt = stmt.where(Adapter.name == name)
    return [_adapter_info(a, b) for a, b in session.execute(stmt.order_by(Adapter.name, Adapter.version))]


def promote_adapter(session: Session, name: str, version: int) -> AdapterInfo:
    """Mark `name:version` as the accepted baseline (and no other version of `name`)."""
    target = find_adapter(session, name, version)
    if target is None:
        raise NotFound(f"adapter {name}:{version} does not exist")
    session.execute(update(Adapter).where(Adapter.name == name).values(promoted=(Adapter.version == version)))
    session.flush()
    return get_adapter(session, target.id)


def promoted_adapter(session: Session, name: str) -> AdapterInfo | None:
    row = session.execute(select(Adapter, BaseModel.name).join(BaseModel, BaseModel.id == Adapter.base_model_id)
                          .where(Adapter.name == name, Adapter.promoted.is_(True))).first()
    return _adapter_info(row[0], row[1]) if row else None


def register_dataset(
    session: Session,
    *,
    name: str,
    split: str,
    content_hash: str,
    task_type: str,
    source: str,
    samples: Sequence[dict[str, Any]],
) -> tuple[DatasetInfo, bool]:
    """Store a dataset and its samples once per content hash; returns (dataset, created)."""
    existing = session.scalar(select(Dataset).where(Dataset.content_hash == content_hash))
    if existing is not None:
        return _dataset_info(existing), False
    version = (session.scalar(select(func.max(Dataset.version)).where(Dataset.name == name)) or 0) + 1
    row = Dataset(name=name, version=version, split=split, content_hash=content_hash, task_type=task_type,
                  n_rows=len(samples), source=source)
    session.add(row)
    session.flush()
    if samples:
        session.execute(
            DatasetSample.__table__.insert(),
            [{"dataset_id": row.id, "idx": i, "sample_id": str(s["id"]), "sample": s} for i, s in enumerate(samples)],
        )
    return _dataset_info(row), True


def get_dataset(session: Session, dataset_id: int) -> DatasetInfo:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"dataset id {dataset_id} does not exist")
    return _dataset_info(row)


def list_datasets(session: Session) -> list[DatasetInfo]:
    return [_dataset_info(d) for d in session.scalars(select(Dataset).order_by(Dataset.name, Dataset.version))]


def load_samples(session: Session, dataset_id: int, start: int, stop: int) -> list[dict[str, Any]]:
    """The stored sample dicts with index in [start, stop), in index order."""
    stmt = (select(DatasetSample.sample).where(DatasetSample.dataset_id == dataset_id, DatasetSample.idx >= start,
                                               DatasetSample.idx < stop).order_by(DatasetSample.idx))
    return [dict(s) for s in session.scalars(stmt)]


# ---------------------------------------------------------------------------------------------------------------
# Jobs, runs, shards


def create_job(
    session: Session,
    *,
    spec: dict[str, Any],
    submitted_by: str,
    base_model_id: int,
    adapter_id: int | None,
    dataset_id: int,
    n_samples: int,
    runs: Sequence[RunSpec],
    shard_ranges: Sequence[tuple[int, int]],
    owner_id: int | None = None,
) -> JobInfo:
    """Create a queued job with its runs and shards (`owner_id`: the API user submitting it, if any)."""
    if not runs:
        raise ValueError("a job needs at least one strategy")
    if len({r.key for r in runs}) != len(runs):
        raise ValueError("duplicate strategy specs in one job")
    job = Job(spec=spec, submitted_by=submitted_by, base_model_id=base_model_id, adapter_id=adapter_id,
              dataset_id=dataset_id, status="queued", n_samples=n_samples, n_shards=len(shard_ranges),
              shards_done=0, shards_failed=0, samples_done=0, cancel_requested=False, owner_id=owner_id)
    session.add(job)
    session.flush()
    session.add_all(Run(job_id=job.id, strategy=r.strategy, params=r.params, key=r.key, run_hash=r.run_hash, info={})
                    for r in runs)
    session.add_all(Shard(job_id=job.id, start=a, stop=b, status="queued", attempts=0, samples_done=0)
                    for a, b in shard_ranges)
    if not shard_ranges:
        job.status, job.finished_at = "done", utcnow()
    session.flush()
    return _job_info(job)


def get_job(session: Session, job_id: int) -> JobInfo:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return _job_info(job)


def list_jobs(session: Session, limit: int = 50, status: str | None = None) -> list[JobInfo]:
    stmt = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return [_job_info(j) for j in session.scalars(stmt)]


def open_job_ids(session: Session) -> list[int]:
    """Ids of the jobs that are not finished (queued or running), oldest first."""
    return list(session.scalars(select(Job.id).where(Job.status.not_in(TERMINAL_JOB)).order_by(Job.id)))


def job_runs(session: Session, job_id: int) -> list[RunInfo]:
    return [_run_info(r) for r in session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.id))]


def job_shards(session: Session, job_id: int) -> list[ShardInfo]:
    return [_shard_info(s) for s in session.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.start))]


def runs_by_hash(session: Session, run_hash: str, status: str = "done") -> list[RunInfo]:
    """Runs with this reuse hash whose job ended with `status` (newest first)."""
    stmt = (select(Run).join(Job, Job.id == Run.job_id).where(Run.run_hash == run_hash, Job.status == status)
            .order_by(Run.id.desc()))
    return [_run_info(r) for r in session.scalars(stmt)]


def set_run_info(session: Session, run_id: int, info: dict[str, Any]) -> None:
    """Merge `info` into a run's info (values fixed at run time, e.g. a calibrated parameter)."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    run.info = {**(run.info or {}), **info}


def claim_shard(session: Session, job_id: int, start: int, worker: str, max_attempts: int,
                holder_alive: Callable[[str, int], bool] | None = None) -> ShardClaim:
    """Decide what to do with a delivered shard and, when it is to run, count the attempt.

    Finished shards are skipped (never recomputed), shards of a cancelled job are cancelled, and a shard already
    started `max_attempts` times (worker killed, or an error each time) is marked failed so it cannot loop. A
    shard running in another process that `holder_alive(worker, shard_id)` says runs it is left to it (`busy`): a
    second message
    for it (the broker's redelivery after its visibility timeout, a sweep racing a redelivery) must not start a
    second, concurrent attempt. A shard still `running` under a dead process is taken over; the loss is recorded.
    """
    shard = session.scalar(_locked(session, select(Shard).where(Shard.job_id == job_id, Shard.start == start)))
    if shard is None:
        raise NotFound(f"job {job_id} has no shard starting at {start}")
    job = session.scalar(_locked(session, select(Job).where(Job.id == job_id)))
    assert job is not None
    if shard.status in ("done", "failed", "cancelled"):
        return ShardClaim(shard.status, _shard_info(shard))
    if job.cancel_requested or job.status == "cancelled":
        shard.status, shard.finished_at = "cancelled", utcnow()
        _finalize_locked(session, job)
        return ShardClaim("cancelled", _shard_info(shard))
    if shard.status == "running" and shard.worker == worker and not job.cancel_requested:
        # this very process ran it and could not record the end (the database failed in the shard's last step):
        # not a new attempt, nothing to blame the shard for
        shard.started_at = utcnow()
        session.flush()
        return ShardClaim("run", _shard_info(shard))
    if shard.status == "running" and shard.worker and shard.worker != worker:
        if holder_alive is not None and holder_alive(shard.worker, shard.id):
            return ShardClaim("busy", _shard_info(shard))
        shard.error = f"attempt {shard.attempts}: worker process {shard.worker} was lost while running it"
    if shard.attempts >= max_attempts:
        last = f"; last error: {shard.error}" if shard.error else " (worker lost each time)"
        shard.status, shard.finished_at = "failed", utcnow()
        shard.error = f"gave up after {shard.attempts} attempts{last}"
        _finalize_locked(session, job)
        return ShardClaim("failed", _shard_info(shard))
    shard.attempts += 1
    shard.status, shard.worker, shard.started_at, shard.finished_at = "running", worker, utcnow(), None
    shard.samples_done = 0
    if job.status == "queued":
        job.status = "running"
        job.started_at = job.started_at or utcnow()
    session.flush()
    return ShardClaim("run", _shard_info(shard))


def shard_progress(session: Session, shard_id: int, samples_done: int) -> None:
    """Record how many samples of the running attempt are stored (the live progress of a job)."""
    session.execute(update(Shard).where(Shard.id == shard_id).values(samples_done=samples_done))


def release_shard(session: Session, shard_id: int, error: str, refund_attempt: bool = False) -> ShardInfo:
    """An attempt failed with `error`: back to queued for a retry (claim_shard enforces the attempt cap).

    `refund_attempt` un-counts the attempt when the failure was not the shard's fault (database connection lost).
    """
    shard = session.scalar(_locked(session, select(Shard).where(Shard.id == shard_id)))
    if shard is None:
        raise NotFound(f"shard {shard_id} does not exist")
    if shard.status == "running":
        shard.status, shard.error = "queued", error
        if refund_attempt and shard.attempts > 0:
            shard.attempts -= 1
    session.flush()
    return _shard_info(shard)


def finish_shard(session: Session, shard_id: int, status: str, error: str | None = None) -> JobInfo:
    """Mark a shard done / failed / cancelled, update the job's counters and finish the job when all shards are."""
    shard = session.scalar(_locked(session, select(Shard).where(Shard.id == shard_id)))
    if shard is None:
        raise NotFound(f"shard {shard_id} does not exist")
    job = session.scalar(_locked(session, select(Job).where(Job.id == shard.job_id)))
    assert job is not None
    if shard.status != "done":
        shard.status, shard.finished_at = status, utcnow()
        if status == "done":
            shard.samples_done, shard.error = shard.stop - shard.start, None
        elif error is not None:
            shard.error = error
    _finalize_locked(session, job)
    return _job_info(job)


def _finalize_locked(session: Session, job: Job) -> None:
    session.flush()
    counts = dict(session.execute(select(Shard.status, func.count()).where(Shard.job_id == job.id)
                                  .group_by(Shard.status)).all())
    job.shards_done = counts.get("done", 0)
    job.shards_failed = counts.get("failed", 0)
    job.samples_done = int(session.scalar(select(func.coalesce(func.sum(Shard.samples_done), 0))
                                          .where(Shard.job_id == job.id)) or 0)
    if job.status in TERMINAL_JOB or counts.get("queued", 0) or counts.get("running", 0):
        session.flush()
        return
    done, failed, cancelled = counts.get("done", 0), counts.get("failed", 0), counts.get("cancelled", 0)
    if cancelled or job.cancel_requested:
        job.status = "cancelled"
    elif failed and done:
        job.status = "partial"
    elif failed:
        job.status = "failed"
    else:
        job.status = "done"
    if failed:
        errors = session.scalars(select(Shard.error).where(Shard.job_id == job.id, Shard.status == "failed")
                                 .order_by(Shard.start).limit(3)).all()
        job.error = f"{failed} of {job.n_shards} shards failed: " + " | ".join(e or "" for e in errors)
    job.finished_at = utcnow()
    session.flush()


def request_cancel(session: Session, job_id: int) -> JobInfo:
    """Cancel a job: queued shards stop now, running ones at their next batch boundary."""
    job = session.scalar(_locked(session, select(Job).where(Job.id == job_id)))
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    if job.status in TERMINAL_JOB:
        return _job_info(job)
    job.cancel_requested = True
    session.execute(update(Shard).where(Shard.job_id == job_id, Shard.status == "queued")
                    .values(status="cancelled", finished_at=utcnow()))
    _finalize_locked(session, job)
    return _job_info(job)


def cancel_requested(session: Session, job_id: int) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def mark_job_failed(session: Session, job_id: int, error: str) -> None:
    """A job that cannot run at all (e.g. its model no longer loads): fail it and its open shards."""
    session.execute(update(Shard).where(Shard.job_id == job_id, Shard.status.in_(("queued", "running")))
                    .values(status="failed", error=error, finished_at=utcnow()))
    job = session.scalar(_locked(session, select(Job).where(Job.id == job_id)))
    if job is not None and job.status not in TERMINAL_JOB:
        _finalize_locked(session, job)
        job.error = error


# ---------------------------------------------------------------------------------------------------------------
# Per-sample results and aggregates


def upsert_sample_results(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert or replace per-sample rows keyed by (run_id, sample_index); returns the number of rows written."""
    if not rows:
        return 0
    now = utcnow()
    values = [{"run_id": r["run_id"], "sample_index": r["sample_index"], "created_at": now,
               **{c: r.get(c) for c in RESULT_COLUMNS}} for r in rows]
    for v in values:
        v["latency_s"] = v["latency_s"] or 0.0
        v["tokens"] = v["tokens"] or 0
    ins = _dialect_insert(session, SampleResult)
    stmt = ins.on_conflict_do_update(
        index_elements=[SampleResult.run_id, SampleResult.sample_index],
        set_={c: getattr(ins.excluded, c) for c in (*RESULT_COLUMNS, "created_at")},
    )
    session.execute(stmt, values)
    return len(values)


def _stderr_of_mean(p: float, n: int) -> float | None:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def refresh_aggregates(session: Session, run_ids: Iterable[int]) -> None:
    """Recompute each run's aggregates from its stored rows (acc, acc_norm, tokens, latency, flip rate,
    fixed/broken and McNemar p vs the job's `ft` run, mean scalar kv statistics)."""
    run_ids = list(run_ids)
    if not run_ids:
        return
    metrics: dict[int, dict[str, tuple[float | None, float | None, int]]] = {r: {} for r in run_ids}
    as_int = lambda c: func.sum(case((c.is_(True), 1), else_=0))  # noqa: E731
    stmt = (select(SampleResult.run_id, func.count(), func.count(SampleResult.correct), as_int(SampleResult.correct),
                   func.count(SampleResult.correct_norm), as_int(SampleResult.correct_norm),
                   func.avg(SampleResult.tokens), func.avg(SampleResult.latency_s), func.avg(SampleResult.flip_rate),
                   func.count(SampleResult.flip_rate), func.count(SampleResult.tie), as_int(SampleResult.tie),
                   func.count(SampleResult.output),
                   func.sum(case((and_(SampleResult.output.is_not(None), SampleResult.extracted.is_(None)), 1),
                                 else_=0)),
                   func.count(SampleResult.error))
            .where(SampleResult.run_id.in_(run_ids)).group_by(SampleResult.run_id))
    for (run_id, n, n_c, k_c, n_cn, k_cn, tok, lat, flip, n_flip, n_mc, ties, n_gen,
         unparsed, n_err) in session.execute(stmt):
        m = metrics[run_id]
        m["n"] = (float(n), None, n)
        if n_err:  # samples without a result (over budget, evaluation raised): not in acc / acc_norm
            m["errors"] = (float(n_err), None, n)
        if n_c:
            p = k_c / n_c
            m["acc"] = (p, _stderr_of_mean(p, n_c), n_c)
        if n_cn:
            p = k_cn / n_cn
            m["acc_norm"] = (p, _stderr_of_mean(p, n_cn), n_cn)
        m["tokens"] = (float(tok) if tok is not None else None, None, n)
        m["latency_s"] = (float(lat) if lat is not None else None, None, n)
        if n_flip:
            m["flip_rate"] = (float(flip), None, n_flip)
        if n_mc:  # samples decided by the all -inf tie-break, out of the MC samples
            m["ties"] = (float(ties or 0), None, n_mc)
        if n_gen:  # generated outputs with no extractable answer, out of the generated samples
            m["unparsed"] = (float(unparsed or 0), None, n_gen)
    _vs_ft_aggregates(session, run_ids, metrics)
    _kv_aggregates(session, run_ids, metrics)
    now = utcnow()
    values = [{"run_id": r, "metric": k, "value": v, "stderr": se, "n": n, "updated_at": now}
              for r, ms in metrics.items() for k, (v, se, n) in ms.items()]
    if values:
        ins = _dialect_insert(session, RunAggregate)
        session.execute(ins.on_conflict_do_update(
            index_elements=[RunAggregate.run_id, RunAggregate.metric],
            set_={c: getattr(ins.excluded, c) for c in ("value", "stderr", "n", "updated_at")}), values)


def _vs_ft_aggregates(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Any]]) -> None:
    """Paired counts against the `ft` run of the same job and the exact McNemar p-value."""
    ft = aliased(Run)
    pairs = dict(session.execute(select(Run.id, ft.id).join(ft, and_(ft.job_id == Run.job_id, ft.strategy == "ft"))
                                 .where(Run.id.in_(run_ids), Run.id != ft.id)).all())
    for run_id, ft_id in pairs.items():
        summary = _paired_counts(session, run_id, ft_id)
        if summary is None:
            continue
        both_right, fixed, broken, both_wrong = summary
        n = both_right + fixed + broken + both_wrong
        m = metrics[run_id]
        m["fixed_vs_ft"] = (float(fixed), None, n)
        m["broken_vs_ft"] = (float(broken), None, n)
        m["mcnemar_p_vs_ft"] = (mcnemar_p(fixed, broken), None, n)


def _paired_counts(session: Session, run_a: int, run_b: int) -> tuple[int, int, int, int] | None:
    """(both right, a right only, b right only, both wrong) over samples both runs scored."""
    a, b = aliased(SampleResult), aliased(SampleResult)
    stmt = (select(a.correct, b.correct, func.count())
            .join(b, and_(b.run_id == run_b, b.sample_index == a.sample_index))
            .where(a.run_id == run_a, a.correct.is_not(None), b.correct.is_not(None))
            .group_by(a.correct, b.correct))
    counts = {(bool(x), bool(y)): int(n) for x, y, n in session.execute(stmt)}
    if not counts:
        return None
    return counts.get((True, True), 0), counts.get((True, False), 0), counts.get((False, True), 0), counts.get((False, False), 0)


def _kv_aggregates(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Any]]) -> None:
    """Mean of each scalar kv statistic per run (kv dicts may also hold lists, e.g. top-k ids: skipped)."""
    sums: dict[int, dict[str, list[float]]] = {r: {} for r in run_ids}
    for run_id, kv in session.execute(select(SampleResult.run_id, SampleResult.kv)
                                      .where(SampleResult.run_id.in_(run_ids), SampleResult.kv.is_not(None))):
        for k, v in (kv or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                acc = sums[run_id].setdefault(k, [0.0, 0.0])
                acc[0] += v
                acc[1] += 1
    for run_id, stats in sums.items():
        for k, (total, n) in stats.items():
            metrics[run_id][f"kv.{k}"] = (total / n, None, int(n))


def run_aggregates(session: Session, run_id: int) -> dict[str, tuple[float | None, float | None, int]]:
    return {m: (v, se, n) for m, v, se, n in session.execute(
        select(RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n)
        .where(RunAggregate.run_id == run_id))}


def sample_rows(session: Session, run_id: int, start: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Stored per-sample rows of one run as dicts (column name -> value), in sample order."""
    stmt = (select(SampleResult).where(SampleResult.run_id == run_id, SampleResult.sample_index >= start)
            .order_by(SampleResult.sample_index))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [{"run_id": r.run_id, "sample_index": r.sample_index, **{c: getattr(r, c) for c in RESULT_COLUMNS}}
            for r in session.scalars(stmt)]


def stored_sample_indices(session: Session, run_ids: Sequence[int], start: int, stop: int) -> set[int]:
    """Sample indices in [start, stop) that have a row in every one of `run_ids` (an earlier attempt stored
    them; a resumed shard skips them)."""
    if not run_ids:
        return set()
    stmt = (select(SampleResult.sample_index)
            .where(SampleResult.run_id.in_(list(run_ids)), SampleResult.sample_index >= start,
                   SampleResult.sample_index < stop)
            .group_by(SampleResult.sample_index)
            .having(func.count(func.distinct(SampleResult.run_id)) == len(set(run_ids))))
    return set(session.scalars(stmt))


def count_sample_rows(session: Session, run_ids: Sequence[int]) -> int:
    return int(session.scalar(select(func.count()).select_from(SampleResult).where(SampleResult.run_id.in_(run_ids))) or 0)


# ---------------------------------------------------------------------------------------------------------------
# Leaderboard and run diff (the dashboard's two hot queries)


def scoring_variant(spec: Mapping[str, Any] | None) -> str:
    """What in a job's config makes its runs score differently from the same strategy key elsewhere: the prompt
    format when not the default (`llm-adapters@1`), beam width, extraction override and the MC floor
    (`mc_floor=-1000`); "" for the default, literal setting. Tables name runs by key + variant so a literal
    and a floored run of the same strategy never hide one another."""
    from tad_core.formats import DEFAULT_FORMAT, canonical_format

    config = (spec or {}).get("config") or {}
    parts = []
    if config.get("format") and config["format"] != canonical_format(DEFAULT_FORMAT):
        parts.append(str(config["format"]))
    if config.get("num_beams", 1) != 1:
        parts.append(f"beams={config['num_beams']}")
    if config.get("extract"):
        parts.append(f"extract={config['extract']}")
    if config.get("mc_floor") is not None:
        parts.append(f"mc_floor={float(config['mc_floor']):g}")
    return ",".join(parts)


def with_variant(name: str, variant: str) -> str:
    """A strategy key (or series name) with the scoring variant when there is one: how runs are named in tables."""
    return f"{name} [{variant}]" if variant else name


def leaderboard(
    session: Session,
    *,
    job_ids: Sequence[int] | None = None,
    dataset_id: int | None = None,
    limit: int = 500,
) -> list[LeaderboardRow]:
    """One row per run with its aggregates, best accuracy first. Reads only runs + run_aggregates."""
    stmt = (select(Run, Job.status, Dataset.name, Dataset.split, BaseModel.name, Adapter.name, Adapter.version,
                   Job.spec)
            .join(Job, Job.id == Run.job_id).join(Dataset, Dataset.id == Job.dataset_id)
            .join(BaseModel, BaseModel.id == Job.base_model_id).outerjoin(Adapter, Adapter.id == Job.adapter_id))
    if job_ids is not None:
        stmt = stmt.where(Run.job_id.in_(list(job_ids)))
    if dataset_id is not None:
        stmt = stmt.where(Job.dataset_id == dataset_id)
    meta = session.execute(stmt.order_by(Run.job_id.desc(), Run.id).limit(limit)).all()
    if not meta:
        return []
    aggs: dict[int, dict[str, tuple[float | None, float | None, int]]] = {}
    for run_id, metric, value, se, n in session.execute(
            select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n)
            .where(RunAggregate.run_id.in_([m[0].id for m in meta]))):
        aggs.setdefault(run_id, {})[metric] = (value, se, n)
    rows = []
    for run, status, ds, split, base, ad_name, ad_ver, spec in meta:
        a = aggs.get(run.id, {})
        get = lambda k, i=0: a[k][i] if k in a else None  # noqa: E731
        adapter = f"{ad_name}:{ad_ver}" if ad_name else (spec.get("finetuned") or None)
        n = int(a["n"][2]) if "n" in a else 0
        fixed, broken = get("fixed_vs_ft"), get("broken_vs_ft")
        rows.append(LeaderboardRow(
            job_id=run.job_id, run_id=run.id, job_status=status, dataset=ds, split=split, base=base, adapter=adapter,
            strategy=run.strategy, key=run.key, params=dict(run.params or {}), n=n,
            acc=get("acc"), acc_stderr=get("acc", 1), acc_norm=get("acc_norm"), acc_norm_stderr=get("acc_norm", 1),
            fixed=int(fixed) if fixed is not None else None, broken=int(broken) if broken is not None else None,
            mcnemar_p=get("mcnemar_p_vs_ft"), metrics={k: v[0] for k, v in a.items()}, info=dict(run.info or {}),
            variant=scoring_variant(spec)))
    rows = _with_holm(rows)
    rows.sort(key=lambda r: (-r.job_id, -(r.acc if r.acc is not None else -1.0), r.key))
    return rows


def _with_holm(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Each row's McNemar p adjusted (Holm) over the comparisons with ft of its own job: one family per job."""
    from dataclasses import replace

    from tad_core.metrics import holm

    by_job: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_job.setdefault(r.job_id, []).append(i)
    out = list(rows)
    for idx in by_job.values():
        for i, adj in zip(idx, holm([rows[i].mcnemar_p for i in idx])):
            out[i] = replace(rows[i], mcnemar_p_holm=adj)
    return out


def run_diff(session: Session, run_a: int, run_b: int, *, only_changed: bool = True, limit: int = 200) -> RunDiff:
    """Per-sample comparison of two runs over the samples both scored: counts, and the rows (changed ones only
    by default) in sample order."""
    counts = _paired_counts(session, run_a, run_b) or (0, 0, 0, 0)
    a, b = aliased(SampleResult), aliased(SampleResult)
    stmt = (select(a.sample_index, a.sample_id, a.correct, b.correct, a.pred, b.pred, a.output, b.output)
            .join(b, and_(b.run_id == run_b, b.sample_index == a.sample_index)).where(a.run_id == run_a))
    if only_changed:
        stmt = stmt.where(a.correct.is_distinct_from(b.correct))
    rows = [DiffRow(*r) for r in session.execute(stmt.order_by(a.sample_index).limit(limit))]
    return RunDiff(run_a, run_b, *counts, rows=rows)


# ---------------------------------------------------------------------------------------------------------------
# Worker heartbeats


def heartbeat(session: Session, worker: str, pid: int, job_id: int | None = None, shard_id: int | None = None,
              info: dict[str, Any] | None = None) -> None:
    """Record that `worker` is alive (and what it works on)."""
    now = utcnow()
    ins = _dialect_insert(session, WorkerHeartbeat)
    session.execute(ins.values(worker=worker, pid=pid, started_at=now, last_seen=now, job_id=job_id,
                               shard_id=shard_id, info=info or {})
                    .on_conflict_do_update(index_elements=[WorkerHeartbeat.worker],
                                           set_={"pid": pid, "last_seen": now, "job_id": job_id,
                                                 "shard_id": shard_id}))


def stale_running_shards(session: Session, dead_after_s: float) -> list[ShardInfo]:
    """Running shards of unfinished jobs, started more than `dead_after_s` seconds ago, that nobody runs: their
    worker process has not beaten for `dead_after_s` (dead, or never beat), or it beats but reports another shard
    or none (it gave the shard up without recording it, e.g. the database failed in the shard's last step and its
    retry message was dropped as `busy`). No broker message will bring them back before the visibility timeout."""
    cutoff = utcnow() - timedelta(seconds=dead_after_s)
    stmt = (select(Shard).join(Job, Job.id == Shard.job_id)
            .outerjoin(WorkerHeartbeat, WorkerHeartbeat.worker == Shard.worker)
            .where(Shard.status == "running", Job.status.not_in(TERMINAL_JOB), Shard.started_at < cutoff,
                   or_(WorkerHeartbeat.worker.is_(None), WorkerHeartbeat.last_seen < cutoff,
                       WorkerHeartbeat.shard_id.is_(None), WorkerHeartbeat.shard_id != Shard.id))
            .order_by(Shard.id))
    return [_shard_info(x) for x in session.scalars(stmt)]


def requeue_stale_shard(session: Session, shard: ShardInfo, reason: str) -> bool:
    """Put a dead worker's shard back to `queued`, only if it is still the same attempt of the same worker.

    A conditional UPDATE: of several sweepers racing on one shard exactly one sees rowcount 1 and sends the
    message; a shard claimed or finished meanwhile is left alone. The attempt stays counted (a shard that kills
    its worker every time still ends failed at the cap).
    """
    res = session.execute(update(Shard).where(Shard.id == shard.id, Shard.status == "running",
                                              Shard.worker == shard.worker, Shard.attempts == shard.attempts)
                          .values(status="queued", error=reason))
    return res.rowcount == 1


def unrequeue_stale_shard(session: Session, shard: ShardInfo) -> None:
    """Undo `requeue_stale_shard` when its message could not be sent, so that the next sweep tries again."""
    session.execute(update(Shard).where(Shard.id == shard.id, Shard.status == "queued",
                                        Shard.worker == shard.worker, Shard.attempts == shard.attempts)
                    .values(status="running"))


def list_workers(session: Session, seen_within_s: float | None = None) -> list[WorkerInfo]:
    stmt = select(WorkerHeartbeat).order_by(WorkerHeartbeat.worker)
    if seen_within_s is not None:
        stmt = stmt.where(WorkerHeartbeat.last_seen >= utcnow() - timedelta(seconds=seen_within_s))
    return [WorkerInfo(w.worker, w.pid, w.started_at, w.last_seen, w.job_id, w.shard_id) for w in session.scalars(stmt)]


# ---------------------------------------------------------------------------------------------------------------
# Regression suites and gate verdicts


def _suite_info(x: Suite) -> SuiteInfo:
    return SuiteInfo(x.id, x.name, x.version, dict(x.spec), x.sha256, x.source, x.created_at)


def add_suite(session: Session, *, name: str, version: int, spec: dict[str, Any], sha256: str,
              source: str = "") -> tuple[SuiteInfo, bool]:
    """Store suite `name:version`; returns (suite, created). The same definition again is a no-op; another
    definition under an existing version raises ValueError (a version is never redefined)."""
    row = session.scalar(select(Suite).where(Suite.name == name, Suite.version == version))
    if row is not None:
        if row.sha256 != sha256:
            raise ValueError(f"suite {name}:{version} already exists with another definition; give the changed "
                             "suite a new version")
        return _suite_info(row), False
    row = Suite(name=name, version=version, spec=spec, sha256=sha256, source=source)
    session.add(row)
    session.flush()
    return _suite_info(row), True


def find_suite(session: Session, name: str, version: int | None = None) -> SuiteInfo | None:
    """Suite `name` at `version`, or its newest version when `version` is None."""
    stmt = select(Suite).where(Suite.name == name)
    stmt = stmt.where(Suite.version == version) if version is not None else stmt.order_by(Suite.version.desc())
    row = session.scalars(stmt.limit(1)).first()
    return _suite_info(row) if row else None


def list_suites(session: Session) -> list[SuiteInfo]:
    return [_suite_info(x) for x in session.scalars(select(Suite).order_by(Suite.name, Suite.version))]


def record_regression_check(session: Session, *, suite_id: int, candidate_id: int, baseline_id: int, alpha: float,
                            min_effect: float, verdict: str, rows: Sequence[dict[str, Any]]) -> int:
    """Store one gate verdict with its rows; returns its id."""
    row = RegressionCheck(suite_id=suite_id, candidate_id=candidate_id, baseline_id=baseline_id, alpha=alpha,
                          min_effect=min_effect, verdict=verdict, rows=list(rows))
    session.add(row)
    session.flush()
    return row.id


def regression_checks(session: Session, adapter_name: str | None = None, limit: int = 100) -> list[RegressionCheckInfo]:
    """Gate verdicts (newest first), those whose candidate is a version of `adapter_name` when given."""
    cand, base = aliased(Adapter), aliased(Adapter)
    stmt = (select(RegressionCheck, Suite.name, Suite.version, cand.name, cand.version, base.name, base.version)
            .join(Suite, Suite.id == RegressionCheck.suite_id)
            .join(cand, cand.id == RegressionCheck.candidate_id).join(base, base.id == RegressionCheck.baseline_id))
    if adapter_name is not None:
        stmt = stmt.where(cand.name == adapter_name)
    out = []
    for c, sn, sv, cn, cv, bn, bv in session.execute(stmt.order_by(RegressionCheck.id.desc()).limit(limit)):
        out.append(RegressionCheckInfo(c.id, c.suite_id, f"{sn}:{sv}", c.candidate_id, f"{cn}:{cv}", c.baseline_id,
                                       f"{bn}:{bv}", c.alpha, c.min_effect, c.verdict, list(c.rows or []),
                                       c.created_at))
    return out
