"""Queueing: send a job's shards to the broker (or mark the job failed when it cannot take them), requeue a
job's unfinished shards, and the recovery every worker process runs periodically (dead workers' shards, a broker
that lost its data, queued shards and gates whose message was lost)."""
from __future__ import annotations

import logging
from typing import Any

from services.db import store
from services.db.session import session_scope
from services.heartbeat import worker_name
from services.settings import Settings, get_settings

log = logging.getLogger(__name__)


def enqueue_job(job_id: int, settings: Settings | None = None) -> int:
    """Send one Celery task per open shard of the job; returns how many were sent."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        shards = [(sh.start, sh.stop) for sh in store.job_shards(s, job_id) if sh.status == "queued"]
    return _send_shards(job_id, shards, settings)


class QueueUnavailable(RuntimeError):
    """A planned job could not be queued (broker unreachable); the job was marked failed so it never waits."""

    def __init__(self, job_id: int, cause: BaseException):
        self.job_id, self.cause = job_id, cause
        super().__init__(f"job {job_id} stored but the broker is unreachable ({cause}); job marked failed")


def enqueue_or_fail(job_id: int, settings: Settings | None = None) -> int:
    """`enqueue_job`, and when the broker cannot take the shards, mark the stored job failed (a job whose
    messages were never sent would otherwise stay queued forever) and raise QueueUnavailable."""
    return enqueue_all_or_fail([job_id], settings)


def enqueue_all_or_fail(job_ids: list[int], settings: Settings | None = None) -> int:
    """Queue every job of a group that only means something whole (a regression gate's jobs); when the broker
    cannot take one, mark them all failed and raise QueueUnavailable (naming the first that could not be
    queued). Returns how many shard messages were sent."""
    settings = settings or get_settings()
    sent = 0
    for job_id in job_ids:
        try:
            sent += enqueue_job(job_id, settings)
        except Exception as e:  # noqa: BLE001 - broker unreachable: the stored jobs must not wait forever
            with session_scope(settings) as s:
                for j in job_ids:
                    store.mark_job_failed(s, j, f"could not queue the shards: {e}")
            raise QueueUnavailable(job_id, e) from e
    return sent


def requeue_job(job_id: int, settings: Settings | None = None) -> int:
    """Send a job's unfinished shards to the broker again; returns how many were sent.

    For when the broker lost its messages (a Redis without persistence restarted, a flushed queue): the job would
    otherwise wait forever. Queued shards are sent, and running shards whose worker has not beaten within
    `dead_after_s` (TAD_WORKER_DEAD_AFTER, default three heartbeat intervals); a shard whose worker is alive is left to it. A duplicate delivery is harmless anyway:
    `claim_shard` skips finished shards and rows are upserted, so nothing is computed into the results twice.
    """
    settings = settings or get_settings()
    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        if job.finished:
            return 0
        alive = {w.worker for w in store.list_workers(s, seen_within_s=settings.dead_after_s)}
        shards = [(sh.start, sh.stop) for sh in store.job_shards(s, job_id)
                  if sh.status == "queued" or (sh.status == "running" and sh.worker not in alive)]
    return _send_shards(job_id, shards, settings)


def sweep_dead_workers(settings: Settings | None = None) -> list[tuple[int, int, int]]:
    """Requeue the running shards of worker processes that stopped beating; returns (job, start, stop) of each
    shard this call requeued.

    Every worker process runs this periodically (services.heartbeat), so a machine that dies loses no shard to
    the broker's visibility timeout (an hour by default) and nobody has to run `tad requeue`. Safe with many
    sweepers at once: `store.requeue_stale_shard` is a conditional UPDATE, so exactly one sweeper wins a shard
    and sends its message; if sending fails the shard is put back as it was and the next sweep tries again.
    """
    settings = settings or get_settings()
    with session_scope(settings) as s:
        stale = store.stale_running_shards(s, settings.dead_after_s)
    requeued = []
    for shard in stale:
        reason = (f"attempt {shard.attempts}: worker process {shard.worker} stopped beating (> "
                  f"{settings.dead_after_s:g} s) or no longer runs it; requeued by {worker_name()}")
        with session_scope(settings) as s:
            if not store.requeue_stale_shard(s, shard, reason):
                continue  # another sweeper, a redelivery or the worker itself got there first
        try:
            _send_shards(shard.job_id, [(shard.start, shard.stop)], settings)
        except Exception as e:  # noqa: BLE001 - broker down: undo, so that the next sweep sends it
            with session_scope(settings) as s:
                store.unrequeue_stale_shard(s, shard)
            log.warning("could not requeue shard %s [%d,%d): %s", shard.job_id, shard.start, shard.stop, e)
            continue
        log.warning("shard %s [%d,%d): %s", shard.job_id, shard.start, shard.stop, reason)
        requeued.append((shard.job_id, shard.start, shard.stop))
    return requeued


def broker_epoch_key(settings: Settings) -> str:
    """The Redis key whose absence tells a sweeper that the broker lost its data (restarted without persistence,
    flushed), and with it the messages of every queued shard."""
    return f"tad:broker-epoch:{settings.queue}"


def recover_lost_queue(settings: Settings | None = None) -> list[tuple[int, int]]:
    """When the broker lost its data, send every queued shard of every unfinished job again; returns
    (job, shards sent) per job. A no-op (one Redis GET) while the broker keeps its data.

    Detection: a marker key lives in the broker; a broker that restarted empty or was flushed has lost it. The
    one sweeper whose SET NX recreates it sends the shards (several sweepers: one winner). A duplicate message is
    harmless (a claimed shard is `busy` or finished for the second one), a lost one would stall the job for ever.
    Only Redis brokers are watched.
    """
    settings = settings or get_settings()
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return []
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        key = broker_epoch_key(settings)
        if client.exists(key) or not client.set(key, worker_name(), nx=True):
            return []
    finally:
        client.close()
    with session_scope(settings) as s:
        todo = {job_id: [(sh.start, sh.stop) for sh in store.job_shards(s, job_id) if sh.status == "queued"]
                for job_id in store.open_job_ids(s)}
    sent = [(job_id, _send_shards(job_id, shards, settings)) for job_id, shards in todo.items() if shards]
    if sent:
        log.warning("the broker lost its data (marker %s missing): sent the queued shards again: %s",
                    broker_epoch_key(settings), ", ".join(f"job {j}: {n}" for j, n in sent))
    return sent


def recover_orphans(settings: Settings | None = None) -> dict[str, list[Any]]:
    """Send again every queued shard and gate, older than `orphan_after` seconds, whose message the broker no
    longer holds (services.broker_messages); returns {"shards": [(job, start, stop)], "gates": [id]} sent.

    The backstop for every way a stored `queued` row can lose its message: the planning process died before
    sending, a retry could not be published, a recovery's send failed. At most one process in the deployment
    checks per `orphan_after` (a Redis SET NX with that expiry); the check reads the queue and the unacked set
    once. Only Redis brokers are watched.
    """
    settings = settings or get_settings()
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return {"shards": [], "gates": []}
    import redis

    from services.broker_messages import pending_tasks

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        if not client.set(f"tad:orphan-check:{settings.queue}", worker_name(), nx=True,
                          px=int(settings.orphan_after * 1000)):
            return {"shards": [], "gates": []}  # another process checked within orphan_after
    finally:
        client.close()
    with session_scope(settings) as s:
        shards = store.queued_shards_older_than(s, settings.orphan_after)
        gates = store.queued_gate_ids_older_than(s, settings.orphan_after)
    if not shards and not gates:
        return {"shards": [], "gates": []}
    pending = pending_tasks(settings)
    lost = [(sh.job_id, sh.start, sh.stop) for sh in shards if ("tad.run_shard", (sh.job_id, sh.start, sh.stop))
            not in pending]
    lost_gates = [g for g in gates if ("tad.run_gate", (g,)) not in pending]
    by_job: dict[int, list[tuple[int, int]]] = {}
    for job_id, start, stop in lost:
        by_job.setdefault(job_id, []).append((start, stop))
    for job_id, ranges in by_job.items():
        _send_shards(job_id, ranges, settings)
    for gate_id in lost_gates:
        send_gate(gate_id, settings)
    if lost or lost_gates:
        log.warning("sent again %d queued shard(s) and %d gate(s) whose messages the broker no longer held: %s",
                    len(lost), len(lost_gates), ", ".join([f"job {j} [{a},{b})" for j, a, b in lost] +
                                                           [f"gate {g}" for g in lost_gates]))
    return {"shards": lost, "gates": lost_gates}


def send_gate(gate_id: int, settings: Settings) -> None:
    """Send one regression gate's `tad.run_gate` message."""
    from services.celery_app import make_celery

    make_celery(settings).send_task("tad.run_gate", args=[gate_id], queue=settings.queue)


def _send_shards(job_id: int, shards: list[tuple[int, int]], settings: Settings) -> int:
    from services.celery_app import make_celery

    app = make_celery(settings)
    with app.producer_or_acquire() as producer:
        for start, stop in shards:
            app.send_task("tad.run_shard", args=[job_id, start, stop], queue=settings.queue, producer=producer)
    return len(shards)
