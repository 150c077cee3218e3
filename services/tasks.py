"""Celery tasks. Only ids cross the wire: `run_shard_task(job_id, start, stop)` and `run_gate_task(gate_id)`.

The shard task calls `services.shard_runner.run_shard`, the same function embedded mode calls; when its job
ends, the regression gates waiting for it advance (services.gates). The gate task plans a gate queued at adapter
registration and queues its jobs, never waiting for them. A failed attempt is retried
(Celery retry, a fresh message); the attempt cap is enforced in the DB by `run_shard`, so a poisoned shard ends
`failed` instead of looping. Worker processes check the schema at start and drop any DB connection inherited
across fork.

A forked pool process must report itself up to the Celery main process within `worker_proc_alive_timeout`, or it
is killed. The heavy torch/transformers import therefore runs in a background thread of the child, after the
child is up (the first shard waits for it), and the timeout itself is raised (TAD_WORKER_PROC_ALIVE_TIMEOUT): a
child replaced after a crash or an OOM kill no longer dies in a start-up loop.
"""
from __future__ import annotations

import logging
import threading

from celery import signals

from services.celery_app import app
from services.db.entities import TERMINAL_JOB
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


_preloaded = threading.Event()  # set once the background engine import of this process finished
_preload_started = threading.Event()  # only forked pool children preload (solo pool / embedded mode do not)
PRELOAD_WAIT_S = 900.0


def _preload() -> None:
    """Import the engine (torch/transformers, 8-13 s cold on a small machine) once per child, off the start-up
    path; an import error is left for the first shard to raise and record."""
    try:
        import services.shard_runner  # noqa: F401
        import tad_core.evaluate  # noqa: F401
    except Exception as e:  # noqa: BLE001 - the shard's own import raises it again, recorded on the shard
        log.error("preloading the engine failed: %s", e)
    finally:
        _preloaded.set()


@signals.worker_process_init.connect
def _child_init(**_: object) -> None:
    """In each forked child: fresh DB pool, the engine import started in the background (after fork: no CUDA
    state crosses it; the child reports itself up at once instead of after the import), and the periodic
    heartbeat thread, which also sweeps for dead workers' shards (services.heartbeat). The model loads with the
    first shard and stays cached."""
    from services.db.session import dispose_engines
    from services.heartbeat import HeartbeatThread

    dispose_engines()
    _preload_started.set()
    threading.Thread(target=_preload, name="tad-preload", daemon=True).start()
    HeartbeatThread(get_settings(), info={"queue": get_settings().queue}, sweep=True).start()


@app.task(name="tad.run_shard", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_shard_task(self, job_id: int, start: int, stop: int) -> dict:  # noqa: ANN001
    """Evaluate one shard of a job (see services.shard_runner.run_shard)."""
    if _preload_started.is_set():  # one import at a time: the task thread never races the preload thread
        _preloaded.wait(PRELOAD_WAIT_S)
    from services.shard_runner import ShardRetry, run_shard

    try:
        outcome = run_shard(int(job_id), int(start), int(stop), get_settings())
    except ShardRetry as exc:
        raise self.retry(exc=exc, countdown=min(30, 2 ** min(self.request.retries, 5)), max_retries=None) from None
    except Exception as exc:  # DB unreachable before/after the attempt was recorded: try again later
        if self.request.retries >= 50:
            raise
        log.warning("shard %s [%s,%s): %s; retrying", job_id, start, stop, exc)
        raise self.retry(exc=exc, countdown=min(30, 1 + self.request.retries), max_retries=None) from None
    if outcome.job_status in TERMINAL_JOB:  # the job ended: a regression gate waiting for it may have its verdict
        from services.gates import on_job_finished

        try:
            on_job_finished(int(job_id), get_settings())
        except Exception as exc:  # noqa: BLE001 - the shard is done; the periodic sweep advances the gate later
            log.warning("job %s ended but its gates were not advanced: %s", job_id, exc)
    return {"action": outcome.action, "samples": outcome.samples, "job_status": outcome.job_status}


@app.task(name="tad.run_gate", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def run_gate_task(self, gate_id: int) -> dict:  # noqa: ANN001
    """Plan a regression gate queued at adapter registration and queue its jobs (services.gates.start_gate)."""
    if _preload_started.is_set():
        _preloaded.wait(PRELOAD_WAIT_S)
    from services.gates import start_gate

    try:
        gate = start_gate(int(gate_id), get_settings())
    except Exception as exc:  # DB unreachable: try again later (a started gate is not started twice)
        if self.request.retries >= 50:
            raise
        log.warning("gate %s: %s; retrying", gate_id, exc)
        raise self.retry(exc=exc, countdown=min(30, 1 + self.request.retries), max_retries=None) from None
    return {"status": gate.status, "jobs": gate.job_ids}
