"""Workers store: heartbeats of worker processes and the shards a dead worker left running.
Functions of a Session returning plain types (services.db.entities); they never commit."""
from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from services.db.dialect import db_cutoff, db_now
from services.db.dialect import dialect_insert as _dialect_insert
from services.db.entities import TERMINAL_JOB, ShardInfo, WorkerInfo
from services.db.jobs import shard_info
from services.db.models import Job, Shard, WorkerHeartbeat


def heartbeat(session: Session, worker: str, pid: int, job_id: int | None = None, shard_id: int | None = None,
              info: dict[str, Any] | None = None) -> None:
    """Record that `worker` is alive (and what it works on)."""
    now = db_now(session)
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
    cutoff = db_cutoff(session, dead_after_s)
    stmt = (select(Shard).join(Job, Job.id == Shard.job_id)
            .outerjoin(WorkerHeartbeat, WorkerHeartbeat.worker == Shard.worker)
            .where(Shard.status == "running", Job.status.not_in(TERMINAL_JOB), Shard.started_at < cutoff,
                   or_(WorkerHeartbeat.worker.is_(None), WorkerHeartbeat.last_seen < cutoff,
                       WorkerHeartbeat.shard_id.is_(None), WorkerHeartbeat.shard_id != Shard.id))
            .order_by(Shard.id))
    return [shard_info(x) for x in session.scalars(stmt)]


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
        stmt = stmt.where(WorkerHeartbeat.last_seen >= db_cutoff(session, seen_within_s))
    return [WorkerInfo(w.worker, w.pid, w.started_at, w.last_seen, w.job_id, w.shard_id) for w in session.scalars(stmt)]
