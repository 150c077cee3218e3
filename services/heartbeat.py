"""A worker process's periodic heartbeat.

Shard start and end alone leave a worker without a beat for as long as a shard runs, so the dashboard could not
tell a busy worker from a dead one. Each Celery worker process therefore runs a daemon thread that records, every
`TAD_HEARTBEAT_INTERVAL` seconds, that the process is alive and which job / shard it is working on (what
`run_shard` last declared with `working_on`). A failed beat (database briefly unreachable) is logged and the next
one tries again: a heartbeat never stops a worker.

The same thread sweeps for dead workers (services.queueing.sweep_dead_workers): every worker process requeues the
running shards of processes whose heartbeat is older than `TAD_WORKER_DEAD_AFTER`, and sends the queued shards
again when the broker lost its data (services.queueing.recover_lost_queue) or a queued shard's or gate's message
is gone (services.queueing.recover_orphans), and gives a regression gate whose jobs
have all ended its verdict (services.gates.advance_open_gates), so recovery needs no person and no single
coordinator.

A process sweeps only after its own beats have succeeded for `TAD_WORKER_DEAD_AFTER` in a row. During a database
outage no process can beat; without that wait, the first process to reach the database again would find every
other live worker's heartbeat stale and requeue all their running shards (a second, concurrent attempt of each).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from services.settings import Settings

log = logging.getLogger(__name__)

@dataclass
class Lane:
    """One line of execution that runs shards one at a time, as the database sees it: its worker name and what it
    works on now. A Celery pool process is one lane (`host:pid`). An embedded job runs in a lane of its own
    (`host:pid-tN`, see `own_lane`): the dashboard runs several jobs at once in threads of one process, and under
    one shared name their heartbeats reported one shard, so a sweep took the others for abandoned and requeued
    them while they ran."""

    name: str
    job_id: int | None = None
    shard_id: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


_local = threading.local()
_process_lanes: dict[int, Lane] = {}  # by pid: a forked child gets its own


def current_lane() -> Lane:
    """The calling thread's lane: its own inside `own_lane`, else the process's."""
    lane = getattr(_local, "lane", None)
    if lane is not None:
        return lane
    pid = os.getpid()
    return _process_lanes.setdefault(pid, Lane(f"{socket.gethostname()}:{pid}"))


@contextmanager
def own_lane() -> Iterator[Lane]:
    """Run the block in a lane of this thread's own (an embedded job)."""
    _local.lane = Lane(f"{socket.gethostname()}:{os.getpid()}-t{threading.get_native_id()}")
    try:
        yield _local.lane
    finally:
        _local.lane = None


def lane_pid(name: str) -> int | None:
    """The process id in a lane name (`host:pid` or `host:pid-tN`), None when it has none."""
    pid = name.rpartition(":")[2].partition("-")[0]
    return int(pid) if pid.isdigit() else None


def worker_name() -> str:
    return current_lane().name


def working_on(job_id: int | None, shard_id: int | None) -> None:
    """Declare what this lane works on now (None, None = idle); the next beat reports it."""
    lane = current_lane()
    with lane.lock:
        lane.job_id, lane.shard_id = job_id, shard_id


def current() -> dict[str, int | None]:
    lane = current_lane()
    with lane.lock:
        return {"job_id": lane.job_id, "shard_id": lane.shard_id}


def beat(settings: Settings, info: dict[str, Any] | None = None, lane: Lane | None = None) -> None:
    """Record one heartbeat of `lane` (default: the caller's) now."""
    from services.db import store
    from services.db.session import session_scope

    lane = lane or current_lane()
    with lane.lock:
        job_id, shard_id = lane.job_id, lane.shard_id
    with session_scope(settings) as s:
        store.heartbeat(s, lane.name, os.getpid(), job_id, shard_id, info=info)


class HeartbeatThread(threading.Thread):
    """Beats for the lane of the thread that creates it every `settings.heartbeat_interval` seconds until
    `stop()`; with `sweep`, also requeues the shards of dead workers every `settings.sweep_every_s` seconds
    (services.queueing.sweep_dead_workers)."""

    def __init__(self, settings: Settings, info: dict[str, Any] | None = None, sweep: bool = False) -> None:
        super().__init__(name="tad-heartbeat", daemon=True)
        self.settings, self.info, self.sweep = settings, info, sweep
        self.lane = current_lane()
        self._stopped = threading.Event()

    def run(self) -> None:
        next_sweep = time.monotonic() + self.settings.sweep_every_s
        healthy_since: float | None = None  # start of this process's current run of successful beats
        while True:
            try:
                beat(self.settings, self.info, self.lane)
                healthy_since = healthy_since if healthy_since is not None else time.monotonic()
            except Exception as e:  # noqa: BLE001 - a heartbeat must never stop a worker
                healthy_since = None
                log.warning("heartbeat failed: %s", e)
            if self.sweep and time.monotonic() >= next_sweep and self.may_sweep(healthy_since):
                next_sweep = time.monotonic() + self.settings.sweep_every_s
                self.sweep_once()
            wait = self.settings.heartbeat_interval
            if self.sweep:
                wait = min(wait, max(0.0, next_sweep - time.monotonic()))
            if self._stopped.wait(wait):
                return

    def sweep_once(self) -> None:
        """Each recovery on its own: one that fails (its service down) is logged and does not skip the others;
        the next sweep tries it again."""
        from services.gates import advance_open_gates
        from services.queueing import recover_lost_queue, recover_orphans, sweep_dead_workers

        for step in (sweep_dead_workers, recover_lost_queue, recover_orphans, advance_open_gates):
            try:
                step(self.settings)
            except Exception as e:  # noqa: BLE001 - nor does a failed sweep stop a worker
                log.warning("sweep step %s failed: %s", step.__name__, e)

    def may_sweep(self, healthy_since: float | None) -> bool:
        """True once this process has beaten without a failure for `dead_after_s`: by then every live worker
        has had the same time to beat again after an outage, so a stale heartbeat means a dead process."""
        return healthy_since is not None and time.monotonic() - healthy_since >= self.settings.dead_after_s

    def stop(self) -> None:
        self._stopped.set()
