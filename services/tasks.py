"""Celery tasks. Only ids cross the wire: `run_shard_task(job_id, start, stop)`.

The task calls `services.jobs.run_shard`, the same function embedded mode calls. A failed attempt is retried
(Celery retry, a fresh message); the attempt cap is enforced in the DB by `run_shard`, so a poisoned shard ends
`failed` instead of looping. Worker processes check the schema at start and drop any DB connection inherited
across fork.
"""
from __future__ import annotations

import logging

from celery import signals

from services.celery_app import app
from services.settings import get_settings

log = logging.getLogger(__name__)


@signals.worker_init.connect
def _check_schema(**_: object) -> None:
    """Refuse to start a worker on a database that is not at the Alembic head."""
    from services.db.schema import ensure_schema_current
    from services.db.session import dispose_engines, get_engine

    try:
        ensure_schema_current(get_engine(get_settings()))
    finally:
        dispose_engines()  # no pooled connection may survive into the forked children


@signals.worker_process_init.connect
def _child_init(**_: object) -> None:
    """In each forked child: fresh DB pool, engine modules imported (after fork: no CUDA state crosses it), and
    the periodic heartbeat thread (services.heartbeat). The model loads with the first shard and stays cached."""
    from services.db.session import dispose_engines
    from services.heartbeat import HeartbeatThread

    dispose_engines()
    import tad_core.evaluate  # noqa: F401 - torch/transformers import once per process, not inside the first shard

    HeartbeatThread(get_settings(), info={"queue": get_settings().queue}).start()


@app.task(name="tad.run_shard", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_shard_task(self, job_id: int, start: int, stop: int) -> dict:  # noqa: ANN001
    """Evaluate one shard of a job (see services.jobs.run_shard)."""
    from services.jobs import ShardRetry, run_shard

    try:
        outcome = run_shard(int(job_id), int(start), int(stop), get_settings())
    except ShardRetry as exc:
        raise self.retry(exc=exc, countdown=min(30, 2 ** min(self.request.retries, 5)), max_retries=None) from None
    except Exception as exc:  # DB unreachable before/after the attempt was recorded: try again later
        if self.request.retries >= 50:
            raise
        log.warning("shard %s [%s,%s): %s; retrying", job_id, start, stop, exc)
        raise self.retry(exc=exc, countdown=min(30, 1 + self.request.retries), max_retries=None) from None
    return {"action": outcome.action, "samples": outcome.samples, "job_status": outcome.job_status}
