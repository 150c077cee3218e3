"""Jobs store: jobs, their runs and shards, the shard claim / release / finish protocol and cancellation.
Functions of a Session returning plain types (services.db.entities); they never commit."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from services.db.dialect import db_cutoff, db_now
from services.db.dialect import locked as _locked
from services.db.entities import TERMINAL_JOB, JobInfo, NotFound, RunInfo, RunSpec, ShardClaim, ShardInfo
from services.db.models import Job, Run, Shard


def _run_info(r: Run) -> RunInfo:
    return RunInfo(r.id, r.job_id, r.strategy, dict(r.params or {}), r.key, r.run_hash, dict(r.info or {}))


def shard_info(s: Shard) -> ShardInfo:
    return ShardInfo(s.id, s.job_id, s.start, s.stop, s.status, s.attempts, s.samples_done, s.error, s.worker,
                     s.started_at, s.finished_at)


def _job_info(j: Job) -> JobInfo:
    return JobInfo(j.id, j.status, j.submitted_by, j.created_at, dict(j.spec), j.dataset_id, j.adapter_id,
                   j.base_model_id, bool(j.cancel_requested), j.n_samples, j.n_shards, j.shards_done,
                   j.shards_failed, j.samples_done, j.error, j.started_at, j.finished_at, j.owner_id)


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
              shards_done=0, shards_failed=0, samples_done=0, cancel_requested=False, owner_id=owner_id,
              created_at=db_now(session))
    session.add(job)
    session.flush()
    session.add_all(Run(job_id=job.id, strategy=r.strategy, params=r.params, key=r.key, run_hash=r.run_hash, info={})
                    for r in runs)
    session.add_all(Shard(job_id=job.id, start=a, stop=b, status="queued", attempts=0, samples_done=0)
                    for a, b in shard_ranges)
    if not shard_ranges:
        job.status, job.finished_at = "done", db_now(session)
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


def queued_shards_older_than(session: Session, age_s: float) -> list[ShardInfo]:
    """Queued shards of unfinished jobs stored more than `age_s` seconds ago, by the database's clock (the
    candidates for a lost message)."""
    cutoff = db_cutoff(session, age_s)
    stmt = (select(Shard).join(Job, Job.id == Shard.job_id)
            .where(Shard.status == "queued", Job.status.not_in(TERMINAL_JOB), Job.created_at < cutoff)
            .order_by(Shard.id))
    return [shard_info(x) for x in session.scalars(stmt)]


def job_runs(session: Session, job_id: int) -> list[RunInfo]:
    return [_run_info(r) for r in session.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.id))]


def job_shards(session: Session, job_id: int) -> list[ShardInfo]:
    return [shard_info(s) for s in session.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.start))]


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

    The attempt is taken by a compare-and-set on the state read here (status, holder, attempts), so two processes
    that read the same `queued` shard cannot both run it: on SQLite, where nothing locks the rows read, the loser's
    update matches no row and it gets `busy`. Locks are taken job first, then shard, as everywhere in this module
    (a cancel racing a claim on Postgres cannot deadlock).
    """
    job = session.scalar(_locked(session, select(Job).where(Job.id == job_id)))
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    shard = session.scalar(_locked(session, select(Shard).where(Shard.job_id == job_id, Shard.start == start)))
    if shard is None:
        raise NotFound(f"job {job_id} has no shard starting at {start}")
    if shard.status in ("done", "failed", "cancelled"):
        return ShardClaim(shard.status, shard_info(shard))
    if job.cancel_requested or job.status == "cancelled":
        shard.status, shard.finished_at = "cancelled", db_now(session)
        _finalize_locked(session, job)
        return ShardClaim("cancelled", shard_info(shard))
    if shard.status == "running" and shard.worker == worker and not job.cancel_requested:
        # this very process ran it and could not record the end (the database failed in the shard's last step):
        # not a new attempt, nothing to blame the shard for
        shard.started_at = db_now(session)
        session.flush()
        return ShardClaim("run", shard_info(shard))
    error = shard.error
    if shard.status == "running" and shard.worker and shard.worker != worker:
        if holder_alive is not None and holder_alive(shard.worker, shard.id):
            return ShardClaim("busy", shard_info(shard))
        error = f"attempt {shard.attempts}: worker process {shard.worker} was lost while running it"
    if shard.attempts >= max_attempts:
        last = f"; last error: {error}" if error else " (worker lost each time)"
        shard.status, shard.finished_at = "failed", db_now(session)
        shard.error = f"gave up after {shard.attempts} attempts{last}"
        _finalize_locked(session, job)
        return ShardClaim("failed", shard_info(shard))
    taken = session.execute(
        update(Shard).where(Shard.id == shard.id, Shard.status == shard.status, Shard.attempts == shard.attempts,
                            Shard.worker.is_(None) if shard.worker is None else Shard.worker == shard.worker)
        .values(attempts=shard.attempts + 1, status="running", worker=worker, started_at=db_now(session),
                finished_at=None,
                samples_done=0, error=error)
        .execution_options(synchronize_session=False))
    session.refresh(shard)
    if taken.rowcount != 1:  # another process claimed it between our read and this write
        return ShardClaim("busy", shard_info(shard))
    if job.status == "queued":
        job.status = "running"
        job.started_at = job.started_at or db_now(session)
    session.flush()
    return ShardClaim("run", shard_info(shard))


def shard_progress(session: Session, shard_id: int, samples_done: int) -> None:
    """Record how many samples of the running attempt are stored (the live progress of a job)."""
    session.execute(update(Shard).where(Shard.id == shard_id).values(samples_done=samples_done))


def release_shard(session: Session, shard_id: int, error: str, worker: str, attempt: int,
                  refund_attempt: bool = False) -> ShardInfo:
    """Attempt `attempt` of `worker` failed with `error`: back to queued for a retry (claim_shard enforces the
    attempt cap). Nothing changes when the shard is no longer that attempt (a sweep took it for dead and another
    worker runs it now): the failed holder must not requeue the new holder's attempt.

    `refund_attempt` un-counts the attempt when the failure was not the shard's fault (database connection lost).
    """
    shard = session.scalar(_locked(session, select(Shard).where(Shard.id == shard_id)))
    if shard is None:
        raise NotFound(f"shard {shard_id} does not exist")
    if shard.status == "running" and shard.worker == worker and shard.attempts == attempt:
        shard.status, shard.error = "queued", error
        if refund_attempt and shard.attempts > 0:
            shard.attempts -= 1
    session.flush()
    return shard_info(shard)


def finish_shard(session: Session, shard_id: int, status: str, error: str | None = None) -> JobInfo:
    """Mark a shard done / failed / cancelled, update the job's counters and finish the job when all shards are."""
    job_id = session.scalar(select(Shard.job_id).where(Shard.id == shard_id))
    if job_id is None:
        raise NotFound(f"shard {shard_id} does not exist")
    job = session.scalar(_locked(session, select(Job).where(Job.id == job_id)))
    shard = session.scalar(_locked(session, select(Shard).where(Shard.id == shard_id)))
    assert job is not None and shard is not None
    if shard.status != "done":
        shard.status, shard.finished_at = status, db_now(session)
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
    job.finished_at = db_now(session)
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
                    .values(status="cancelled", finished_at=db_now(session)))
    _finalize_locked(session, job)
    return _job_info(job)


def cancel_requested(session: Session, job_id: int) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def mark_job_failed(session: Session, job_id: int, error: str) -> None:
    """A job that cannot run at all (e.g. its model no longer loads): fail it and its open shards."""
    job = session.scalar(_locked(session, select(Job).where(Job.id == job_id)))
    session.execute(update(Shard).where(Shard.job_id == job_id, Shard.status.in_(("queued", "running")))
                    .values(status="failed", error=error, finished_at=db_now(session)))
    if job is not None and job.status not in TERMINAL_JOB:
        _finalize_locked(session, job)
        job.error = error
