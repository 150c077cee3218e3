"""A worker process's periodic heartbeat.

Shard start and end alone leave a worker without a beat for as long as a shard runs, so the dashboard could not
tell a busy worker from a dead one. Each Celery worker process therefore runs a daemon thread that records, every
`TAD_HEARTBEAT_INTERVAL` seconds, that the process is alive and which job / shard it is working on (what
`run_shard` last declared with `working_on`). A failed beat (database briefly unreachable) is logged and the next
one tries again: a heartbeat never stops a worker.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from services.settings import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_current: dict[str, int | None] = {"job_id": None, "shard_id": None}


def working_on(job_id: int | None, shard_id: int | None) -> None:
    """Declare what this process works on now (None, None = idle); the next beat reports it."""
    with _lock:
        _current.update(job_id=job_id, shard_id=shard_id)


def current() -> dict[str, int | None]:
    with _lock:
        return dict(_current)


def beat(settings: Settings, info: dict[str, Any] | None = None) -> None:
    """Record one heartbeat of this process now."""
    from services.db import store
    from services.db.session import session_scope
    from services.jobs import worker_name

    now = current()
    with session_scope(settings) as s:
        store.heartbeat(s, worker_name(), os.getpid(), now["job_id"], now["shard_id"], info=info)


class HeartbeatThread(threading.Thread):
    """Beats every `settings.heartbeat_interval` seconds until `stop()`."""

    def __init__(self, settings: Settings, info: dict[str, Any] | None = None) -> None:
        super().__init__(name="tad-heartbeat", daemon=True)
        self.settings, self.info = settings, info
        self._stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                beat(self.settings, self.info)
            except Exception as e:  # noqa: BLE001 - a heartbeat must never stop a worker
                log.warning("heartbeat failed: %s", e)
            if self._stopped.wait(self.settings.heartbeat_interval):
                return

    def stop(self) -> None:
        self._stopped.set()
