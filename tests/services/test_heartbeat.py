"""The periodic heartbeat thread of a worker process (services.heartbeat)."""
from __future__ import annotations

import os
import time

from services import heartbeat
from services.db import store
from services.db.session import make_engine, session_scope
from services.settings import Settings


def _rows(url: str) -> list[store.WorkerInfo]:
    engine = make_engine(url)
    with session_scope(engine) as s:
        rows = [w for w in store.list_workers(s) if w.pid == os.getpid()]
    engine.dispose()
    return rows


def test_thread_beats_periodically_with_the_current_shard(migrated_url: str) -> None:
    thread = heartbeat.HeartbeatThread(Settings(database_url=migrated_url, heartbeat_interval=0.1))
    try:
        heartbeat.working_on(7, 11)
        thread.start()
        deadline = time.monotonic() + 10
        seen = set()
        while time.monotonic() < deadline and len(seen) < 3:
            seen |= {(w.last_seen, w.job_id, w.shard_id) for w in _rows(migrated_url)}
            time.sleep(0.05)
        assert len(seen) >= 3 and {(j, sh) for _, j, sh in seen} == {(7, 11)}  # several beats, each naming the shard
        heartbeat.working_on(None, None)
        time.sleep(0.3)
        (row,) = _rows(migrated_url)
        assert (row.job_id, row.shard_id) == (None, None)
    finally:
        heartbeat.working_on(None, None)
        thread.stop()
        thread.join(5)
    assert not thread.is_alive()


def test_failed_beats_do_not_stop_the_thread(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'missing-dir' / 'no.db'}"  # cannot be opened: every beat fails
    thread = heartbeat.HeartbeatThread(Settings(database_url=url, heartbeat_interval=0.05))
    thread.start()
    time.sleep(0.4)
    assert thread.is_alive()
    thread.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_no_sweep_until_this_process_has_beaten_for_dead_after(tmp_path, caplog) -> None:
    """After a database outage every heartbeat is stale; the first process back must not take the live workers'
    shards for dead. A process sweeps only after `dead_after_s` of successful beats in a row: while its beats fail
    (here: a database that cannot be opened) it never sweeps, where it used to every `sweep_every_s`."""
    import logging

    url = f"sqlite:///{tmp_path / 'missing-dir' / 'no.db'}"
    settings = Settings(database_url=url, heartbeat_interval=0.05, sweep_interval=0.05, worker_dead_after=0.2)
    thread = heartbeat.HeartbeatThread(settings, sweep=True)
    with caplog.at_level(logging.WARNING, logger="services.heartbeat"):
        thread.start()
        time.sleep(0.8)
        thread.stop()
        thread.join(5)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("heartbeat failed") for m in messages)
    assert not any("sweep step" in m for m in messages), messages  # no sweep was even tried

    now = time.monotonic()
    assert not thread.may_sweep(None)  # the last beat failed
    assert not thread.may_sweep(now - 0.1)  # healthy for less than dead_after_s
    assert thread.may_sweep(now - 0.25)
