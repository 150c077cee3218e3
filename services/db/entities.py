"""The plain result types the store functions return (frozen dataclasses, no ORM objects).

Callers never hold ORM objects past a session: every store module converts its rows into these. They live apart
from the queries so the CLI, the API schemas and the dashboard can import them without SQL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.db.naming import with_variant

TERMINAL_JOB = ("done", "failed", "partial", "cancelled")
RESULT_COLUMNS = ("sample_id", "output", "extracted", "pred", "pred_norm", "scores", "correct", "correct_norm",
                  "flip_rate", "vs_ft", "tie", "latency_s", "tokens", "kv", "error")


class NotFound(LookupError):
    """A job, run, adapter or dataset id/name that does not exist."""


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


GATE_FINISHED = ("passed", "regressed", "error")


@dataclass(frozen=True)
class GateRunInfo:
    """A gate queued for an adapter version at registration (services.gates); `verdict` once it has one."""

    id: int
    candidate_id: int
    candidate: str  # name:version
    suite_id: int
    suite: str  # name:version
    status: str  # queued | running | finishing | passed | regressed | error
    alpha: float
    min_effect: float
    job_ids: list[int]
    check_id: int | None
    error: str | None
    submitted_by: str
    created_at: datetime
    finished_at: datetime | None
    baseline: str | None = None  # name:version compared with (pinned when queued; None for old gates)

    @property
    def finished(self) -> bool:
        return self.status in GATE_FINISHED

    @property
    def verdict(self) -> str | None:
        """passed / regressed once the check is stored, else None (queued, running, or no verdict: error)."""
        return self.status if self.status in ("passed", "regressed") else None

