"""ORM models of the results database (SQLAlchemy 2 typed mappings; Postgres and SQLite).

Conventions: every constraint and index is named (`NAMING` below) so Alembic migrations are stable across
dialects; status strings are enforced by CHECK constraints; JSON columns are JSONB on Postgres.
Only `migrations/` changes the schema; `tests/services/test_migrations.py` checks this file and the Alembic head
agree.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JOB_STATUSES = ("queued", "running", "done", "failed", "partial", "cancelled")
SHARD_STATUSES = ("queued", "running", "done", "failed", "cancelled")
VS_FT = ("fixed", "broken")
TOKEN_SCOPES = ("submit", "admin")

JsonType = JSON().with_variant(JSONB(), "postgresql")
# BIGINT primary keys on Postgres (sample_results grows to millions), INTEGER on SQLite (rowid alias).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class BaseModel(Base):
    """A pre-trained base model (registered name or local directory) that adapters belong to."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    licence: Mapped[str | None] = mapped_column(Text)  # e.g. "Gemma Terms of Use"; recorded when the model is fetched
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Adapter(Base):
    """One version of a fine-tuned side: a PEFT adapter directory or a fully fine-tuned model directory."""

    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        Index(None, "sha256"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    method: Mapped[str] = mapped_column(String(50))  # lora, prefix, ..., or "full" for a fine-tuned checkpoint
    sha256: Mapped[str] = mapped_column(String(64))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    manifest: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    base_model: Mapped[BaseModel] = relationship()


class Dataset(Base):
    """An evaluation dataset split, stored in the DB so workers on other machines need nothing on disk."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("name", "version"), CheckConstraint("n_rows >= 0", name="n_rows_nonneg"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(50))
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    task_type: Mapped[str] = mapped_column(String(20))
    n_rows: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetSample(Base):
    __tablename__ = "dataset_samples"
    __table_args__ = (UniqueConstraint("dataset_id", "idx"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    sample_id: Mapped[str] = mapped_column(String(200))
    sample: Mapped[dict[str, Any]] = mapped_column(JsonType)


class Job(Base):
    """One submitted evaluation: a model pair x a dataset slice x a list of strategy specs."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        Index(None, "status"),
        Index(None, "created_at"),
        Index(None, "dataset_id"),
        Index(None, "adapter_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    submitted_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Everything a worker needs: base, adapter/finetuned paths, strategies, EvalConfig, split, limit.
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    adapter_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    n_samples: Mapped[int] = mapped_column(Integer, default=0)
    n_shards: Mapped[int] = mapped_column(Integer, default=0)
    shards_done: Mapped[int] = mapped_column(Integer, default=0)
    shards_failed: Mapped[int] = mapped_column(Integer, default=0)
    samples_done: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The API user who submitted the job (NULL for jobs submitted straight to the DB: CLI, dashboard, embedded).
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)

    runs: Mapped[list[Run]] = relationship(back_populates="job", order_by="Run.id")
    shards: Mapped[list[Shard]] = relationship(back_populates="job", order_by="Shard.start")


class Shard(Base):
    """A contiguous range of dataset sample indices [start, stop): the unit of work of one Celery task."""

    __tablename__ = "shards"
    __table_args__ = (
        UniqueConstraint("job_id", "start"),
        CheckConstraint(_in("status", SHARD_STATUSES), name="status"),
        CheckConstraint("stop > start", name="range"),
        Index(None, "job_id", "status"),
        Index(None, "status"),  # the sweeps' lookups across jobs (running of dead workers, queued without message)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    samples_done: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="shards")


class Run(Base):
    """Job x one strategy spec. `run_hash` identifies identical requests so results can be reused."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("job_id", "key"), Index(None, "run_hash"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    strategy: Mapped[str] = mapped_column(String(50))
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    key: Mapped[str] = mapped_column(String(300))
    run_hash: Mapped[str] = mapped_column(String(64))
    # Values fixed at run time that belong with the results (e.g. SVDecode's calibrated mu).
    info: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="runs")


class SampleResult(Base):
    """One sample under one run. Unique (run_id, sample_index): redelivered shards upsert, never duplicate."""

    __tablename__ = "sample_results"
    __table_args__ = (
        UniqueConstraint("run_id", "sample_index"),
        CheckConstraint("vs_ft IS NULL OR " + _in("vs_ft", VS_FT), name="vs_ft"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    sample_index: Mapped[int] = mapped_column(Integer)
    sample_id: Mapped[str] = mapped_column(String(200))
    output: Mapped[str | None] = mapped_column(Text)
    extracted: Mapped[str | None] = mapped_column(Text)
    pred: Mapped[int | None] = mapped_column(Integer)
    pred_norm: Mapped[int | None] = mapped_column(Integer)
    scores: Mapped[list[float] | None] = mapped_column(JsonType)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    correct_norm: Mapped[bool | None] = mapped_column(Boolean)
    flip_rate: Mapped[float | None] = mapped_column(Float)
    vs_ft: Mapped[str | None] = mapped_column(String(8))
    tie: Mapped[bool | None] = mapped_column(Boolean)  # MC: every choice -inf, predicted by the tie-break
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    kv: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    # Why this sample has no result (over a budget, its evaluation raised); NULL for an evaluated sample.
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunAggregate(Base):
    """A metric of one run (acc, acc_norm, mean kv statistics, ...), refreshed as shards land."""

    __tablename__ = "run_aggregates"
    __table_args__ = (UniqueConstraint("run_id", "metric"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(100))
    value: Mapped[float | None] = mapped_column(Float)
    stderr: Mapped[float | None] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ShardAggregate(Base):
    """Partial sums of one shard's rows for one run: (`total`, `n`) per metric name, e.g. `acc` = (correct
    samples, samples with `correct`), `kv.kl_mean` = (sum, count), `fixed_vs_ft` = (fixed, paired samples).

    Every run metric is a ratio or a mean of sums over its samples, and sums decompose over sample ranges. A
    shard's partials are computed once, from its own rows, when the shard ends (services.db.aggregates); a run's
    aggregates are then the sums of its shards' partials, a few hundred small rows, instead of a pass over every
    stored row (and every row's kv JSON) after each shard. Keyed by the shard's first sample index: a redelivered
    or resumed shard replaces its partials, so nothing is counted twice.
    """

    __tablename__ = "shard_aggregates"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    start: Mapped[int] = mapped_column(Integer, primary_key=True)  # the shard's first sample index
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    total: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(BigInteger)


class WorkerHeartbeat(Base):
    """Last sign of life of each worker process (the dashboard shows live workers from here)."""

    __tablename__ = "worker_heartbeats"

    worker: Mapped[str] = mapped_column(String(200), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    job_id: Mapped[int | None] = mapped_column(Integer)
    shard_id: Mapped[int | None] = mapped_column(Integer)
    info: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)


GATE_VERDICTS = ("passed", "regressed")


class Suite(Base):
    """A named, versioned regression suite: datasets (name, split, limit) x strategies x generation config.

    `spec` is the validated definition (services.suites); `sha256` its canonical hash, so re-adding the same file
    is recognised and a version is never silently redefined.
    """

    __tablename__ = "suites"
    __table_args__ = (UniqueConstraint("name", "version"), CheckConstraint("version >= 1", name="version_positive"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    sha256: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RegressionCheck(Base):
    """One `tad regress` verdict: a candidate adapter against a baseline on a suite, with its per-(dataset,
    strategy) rows (runs compared, accuracies, difference and CI, McNemar p, verdict) kept as JSON."""

    __tablename__ = "regression_checks"
    __table_args__ = (
        CheckConstraint(_in("verdict", GATE_VERDICTS), name="verdict"),
        Index(None, "candidate_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    suite_id: Mapped[int] = mapped_column(ForeignKey("suites.id"))
    candidate_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    baseline_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    alpha: Mapped[float] = mapped_column(Float)
    min_effect: Mapped[float] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(16))
    rows: Mapped[list[dict[str, Any]]] = mapped_column(JsonType, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


GATE_STATUSES = ("queued", "running", "finishing", "passed", "regressed", "error")


class AdapterFamily(Base):
    """Settings of an adapter family (every version registered under one name): the suites each new version is
    gated on when it is registered (`gate_suites`, suite references NAME or NAME:VERSION)."""

    __tablename__ = "adapter_families"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    gate_suites: Mapped[list[str]] = mapped_column(JsonType, default=list)


class GateRun(Base):
    """A regression gate queued for an adapter version at registration and run by the workers: `queued` until a
    worker plans its jobs, `running` while they run, then the verdict (`passed` / `regressed`, with the stored
    check) or `error` (why there is no verdict)."""

    __tablename__ = "gate_runs"
    __table_args__ = (
        CheckConstraint(_in("status", GATE_STATUSES), name="status"),
        Index(None, "candidate_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    suite_id: Mapped[int] = mapped_column(ForeignKey("suites.id"))
    # the version promoted when the gate was queued (None: gates queued before 0010, compared with the promoted one)
    baseline_id: Mapped[int | None] = mapped_column(ForeignKey("adapters.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    alpha: Mapped[float] = mapped_column(Float)
    min_effect: Mapped[float] = mapped_column(Float)
    job_ids: Mapped[list[int]] = mapped_column(JsonType, default=list)
    check_id: Mapped[int | None] = mapped_column(ForeignKey("regression_checks.id"), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    submitted_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class User(Base):
    """A person (or a CI robot) who talks to the HTTP API; owns the jobs submitted with their tokens."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiToken(Base):
    """A bearer token of one user. Only the sha256 of the token is stored: a leaked table grants nothing."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint(_in("scope", TOKEN_SCOPES), name="scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
