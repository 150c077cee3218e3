"""Read-only queries for the dashboard that `store.py` does not cover.

Like the store functions they take a Session, return plain dataclasses / lists and never commit; they use only
portable SQLAlchemy 2 `select()` constructs, so they work on Postgres and SQLite alike. JSON columns (`kv`) are
read whole and filtered in Python rather than with dialect-specific JSON operators.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from services.db import store
from services.db.kv_stats import scalar_kv_stats
from services.db.models import (
    Adapter,
    BaseModel,
    Dataset,
    DatasetSample,
    Job,
    Run,
    RunAggregate,
    SampleResult,
    Shard,
    User,
)


@dataclass(frozen=True)
class RunRow:
    """One run with everything the dashboard groups and filters by, and its headline aggregates."""

    run_id: int
    job_id: int
    job_status: str
    job_created_at: datetime
    dataset_id: int
    dataset: str
    dataset_version: int
    split: str
    task_type: str
    base: str
    adapter_id: int | None
    adapter_name: str | None
    adapter_version: int | None
    adapter_promoted: bool
    adapter_created_at: datetime | None
    finetuned: str | None
    strategy: str
    key: str
    params: dict[str, Any]
    n: int
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    variant: str = ""  # store.scoring_variant of the run's job

    @property
    def label(self) -> str:
        return store.with_variant(self.key, self.variant)

    @property
    def adapter_label(self) -> str | None:
        if self.adapter_name is not None:
            return f"{self.adapter_name}:{self.adapter_version}"
        return self.finetuned

    @property
    def dataset_label(self) -> str:
        return f"{self.dataset}:{self.split}"


@dataclass(frozen=True)
class PairedOutcome:
    sample_index: int
    a_correct: bool
    b_correct: bool


@dataclass(frozen=True)
class KvSampleRow:
    """Scalar knowledge-vector statistics of one sample under one run (lists such as per_step left out)."""

    sample_index: int
    sample_id: str
    correct: bool | None
    vs_ft: str | None
    flip_rate: float | None
    tokens: int
    stats: dict[str, float]
    has_steps: bool


@dataclass(frozen=True)
class JobProgress:
    """A job with its live progress: samples stored so far, counted from the shards (updated every batch)."""

    id: int
    status: str
    submitted_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    dataset: str
    split: str
    model: str
    strategies: list[str]
    n_samples: int
    samples_done: int
    n_shards: int
    shards_done: int
    shards_failed: int
    shards_running: int
    cancel_requested: bool
    error: str | None
    owner: str | None = None  # the API user who submitted it (jobs written straight to the DB have none)

    @property
    def fraction(self) -> float:
        return min(1.0, self.samples_done / self.n_samples) if self.n_samples else 1.0

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")


def list_runs(
    session: Session,
    *,
    dataset_id: int | None = None,
    adapter_name: str | None = None,
    strategies: Sequence[str] | None = None,
    statuses: Sequence[str] | None = None,
    limit: int = 5000,
) -> list[RunRow]:
    """Runs (newest job first) with dataset, model and adapter details and their acc / acc_norm aggregates."""
    stmt = (select(Run, Job.status, Job.created_at, Job.spec, Dataset, BaseModel.name, Adapter)
            .join(Job, Job.id == Run.job_id).join(Dataset, Dataset.id == Job.dataset_id)
            .join(BaseModel, BaseModel.id == Job.base_model_id).outerjoin(Adapter, Adapter.id == Job.adapter_id))
    if dataset_id is not None:
        stmt = stmt.where(Job.dataset_id == dataset_id)
    if adapter_name is not None:
        stmt = stmt.where(Adapter.name == adapter_name)
    if strategies is not None:
        stmt = stmt.where(Run.strategy.in_(list(strategies)))
    if statuses is not None:
        stmt = stmt.where(Job.status.in_(list(statuses)))
    meta = session.execute(stmt.order_by(Run.job_id.desc(), Run.id).limit(limit)).all()
    if not meta:
        return []
    aggs: dict[int, dict[str, tuple[float | None, float | None, int]]] = {}
    run_ids = [m[0].id for m in meta]
    for i in range(0, len(run_ids), 500):  # stay under SQLite's bound-parameter limit
        for run_id, metric, value, se, n in session.execute(
                select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr,
                       RunAggregate.n)
                .where(RunAggregate.run_id.in_(run_ids[i:i + 500]),
                       RunAggregate.metric.in_(("n", "acc", "acc_norm")))):
            aggs.setdefault(run_id, {})[metric] = (value, se, n)
    rows = []
    for run, status, created, spec, ds, base, ad in meta:
        a = aggs.get(run.id, {})
        rows.append(RunRow(
            run_id=run.id, job_id=run.job_id, job_status=status, job_created_at=created, dataset_id=ds.id,
            dataset=ds.name, dataset_version=ds.version, split=ds.split, task_type=ds.task_type, base=base,
            adapter_id=ad.id if ad else None, adapter_name=ad.name if ad else None,
            adapter_version=ad.version if ad else None, adapter_promoted=bool(ad.promoted) if ad else False,
            adapter_created_at=ad.created_at if ad else None, finetuned=(spec or {}).get("finetuned"),
            strategy=run.strategy, key=run.key, params=dict(run.params or {}),
            n=int(a["n"][2]) if "n" in a else 0,
            acc=a["acc"][0] if "acc" in a else None, acc_stderr=a["acc"][1] if "acc" in a else None,
            acc_norm=a["acc_norm"][0] if "acc_norm" in a else None,
            acc_norm_stderr=a["acc_norm"][1] if "acc_norm" in a else None, variant=store.scoring_variant(spec)))
    return rows


def paired_outcomes(session: Session, run_a: int, run_b: int, *, norm: bool = False) -> list[PairedOutcome]:
    """Correctness of two runs on every sample both scored (matched by sample index), in sample order.

    `norm` pairs `correct_norm` (acc_norm) instead of `correct`.
    """
    a, b = aliased(SampleResult), aliased(SampleResult)
    ca, cb = (a.correct_norm, b.correct_norm) if norm else (a.correct, b.correct)
    stmt = (select(a.sample_index, ca, cb)
            .join(b, and_(b.run_id == run_b, b.sample_index == a.sample_index))
            .where(a.run_id == run_a, ca.is_not(None), cb.is_not(None))
            .order_by(a.sample_index))
    return [PairedOutcome(int(i), bool(x), bool(y)) for i, x, y in session.execute(stmt)]


def error_indices(session: Session, run_id: int) -> set[int]:
    """The sample indices of a run whose evaluation failed (a stored `error`, no result): `paired_outcomes`
    leaves them out, so a comparison must look at them itself."""
    stmt = select(SampleResult.sample_index).where(SampleResult.run_id == run_id, SampleResult.error.is_not(None))
    return {int(i) for i in session.scalars(stmt)}


def samples_at(session: Session, dataset_id: int, indices: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The stored dataset samples at `indices` (index -> sample dict); missing indices are left out."""
    out: dict[int, dict[str, Any]] = {}
    wanted = sorted(set(int(i) for i in indices))
    for i in range(0, len(wanted), 500):
        stmt = select(DatasetSample.idx, DatasetSample.sample).where(
            DatasetSample.dataset_id == dataset_id, DatasetSample.idx.in_(wanted[i:i + 500]))
        out.update({int(idx): dict(sample) for idx, sample in session.execute(stmt)})
    return out


def kv_sample_stats(session: Session, run_id: int) -> list[KvSampleRow]:
    """Per-sample scalar kv statistics of a run (KL, ||kv||_1, entropies, ...) and its flip rate."""
    stmt = (select(SampleResult.sample_index, SampleResult.sample_id, SampleResult.correct, SampleResult.vs_ft,
                   SampleResult.flip_rate, SampleResult.tokens, SampleResult.kv)
            .where(SampleResult.run_id == run_id).order_by(SampleResult.sample_index))
    return [KvSampleRow(int(i), sid, c, vs, fr, int(tok or 0), scalar_kv_stats(kv),
                        bool(isinstance(kv, dict) and kv.get("per_step")))
            for i, sid, c, vs, fr, tok, kv in session.execute(stmt)]


def sample_result(session: Session, run_id: int, sample_index: int) -> dict[str, Any] | None:
    """One stored per-sample row (with its full kv, per-step statistics included), or None."""
    r = session.scalar(select(SampleResult).where(SampleResult.run_id == run_id,
                                                  SampleResult.sample_index == sample_index))
    if r is None:
        return None
    return {"run_id": r.run_id, "sample_index": r.sample_index, "sample_id": r.sample_id, "output": r.output,
            "extracted": r.extracted, "pred": r.pred, "pred_norm": r.pred_norm, "scores": r.scores,
            "correct": r.correct, "correct_norm": r.correct_norm, "flip_rate": r.flip_rate, "vs_ft": r.vs_ft,
            "latency_s": r.latency_s, "tokens": r.tokens, "kv": r.kv}


def job_progress(session: Session, *, limit: int = 50, job_ids: Sequence[int] | None = None) -> list[JobProgress]:
    """Newest jobs first with live progress: the job row's counters are refreshed when a shard finishes, the
    shards' `samples_done` after every batch, so progress is summed from the shards."""
    stmt = (select(Job, Dataset.name, Dataset.split, BaseModel.name, Adapter.name, Adapter.version, User.name)
            .join(Dataset, Dataset.id == Job.dataset_id).join(BaseModel, BaseModel.id == Job.base_model_id)
            .outerjoin(Adapter, Adapter.id == Job.adapter_id).outerjoin(User, User.id == Job.owner_id))
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(list(job_ids)))
    meta = session.execute(stmt.order_by(Job.id.desc()).limit(limit)).all()
    if not meta:
        return []
    ids = [m[0].id for m in meta]
    done_by_job: dict[int, int] = {}
    running_by_job: dict[int, int] = {}
    for job_id, status, count, samples in session.execute(
            select(Shard.job_id, Shard.status, func.count(), func.coalesce(func.sum(Shard.samples_done), 0))
            .where(Shard.job_id.in_(ids)).group_by(Shard.job_id, Shard.status)):
        done_by_job[job_id] = done_by_job.get(job_id, 0) + int(samples)
        if status == "running":
            running_by_job[job_id] = int(count)
    keys: dict[int, list[str]] = {}
    for job_id, key in session.execute(select(Run.job_id, Run.key).where(Run.job_id.in_(ids)).order_by(Run.id)):
        keys.setdefault(job_id, []).append(key)
    out = []
    for job, ds, split, base, ad_name, ad_ver, owner in meta:
        spec = job.spec or {}
        model = f"{ad_name}:{ad_ver}" if ad_name else (spec.get("finetuned") or base)
        out.append(JobProgress(
            id=job.id, status=job.status, submitted_by=job.submitted_by, created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at, dataset=ds, split=split,
            model=f"{base} + {model}" if model != base else base, strategies=keys.get(job.id, []),
            n_samples=job.n_samples,
            samples_done=max(job.samples_done, done_by_job.get(job.id, 0)), n_shards=job.n_shards,
            shards_done=job.shards_done, shards_failed=job.shards_failed,
            shards_running=running_by_job.get(job.id, 0), cancel_requested=bool(job.cancel_requested),
            error=job.error, owner=owner))
    return out
