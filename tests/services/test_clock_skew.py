"""One clock for the deployment: the database's (services.db.dialect.db_now).

Heartbeats, shard starts and job creation are written by one machine and judged by another (a sweep takes a
worker whose heartbeat is older than `dead_after_s` for dead; the orphan check re-sends queued work older than
`orphan_after`). These tests move this process's clock with time-machine, as a host whose clock is wrong, and
check that the judgements on Postgres follow the database's clock. On the old code (each host's own clock) a
worker whose clock ran ten minutes behind was found dead while it beat, and its running shard was requeued.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import time_machine

from services.db import store
from services.db.dialect import db_now
from services.db.schema import upgrade
from services.db.session import make_engine, session_scope
from tests.services.test_store import _job

SKEW = timedelta(minutes=10)


def _wrong_clock(offset: timedelta) -> time_machine.travel:
    return time_machine.travel(datetime.now(timezone.utc) + offset, tick=True)


def test_a_worker_whose_clock_is_behind_is_not_taken_for_dead(pg_url: str) -> None:
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with session_scope(engine) as s:
        job = _job(s)
    with _wrong_clock(-SKEW), session_scope(engine) as s:  # the worker's host, ten minutes behind
        claim = store.claim_shard(s, job.id, 0, "gpu-2:77", 3)
        assert claim.action == "run"
        store.heartbeat(s, "gpu-2:77", 77, job.id, claim.shard.id)
    for sweeper in (timedelta(0), SKEW):  # a sweeper on a right clock, and one ten minutes ahead
        with _wrong_clock(sweeper), session_scope(engine) as s:
            assert [w.worker for w in store.list_workers(s, seen_within_s=60)] == ["gpu-2:77"]
            stale = store.stale_running_shards(s, dead_after_s=60)
            assert stale == [], f"sweeper at {sweeper}: {stale}"
    engine.dispose()


def test_queued_work_ages_on_the_database_clock(pg_url: str) -> None:
    """A job stored by a host whose clock is behind is not an orphan at once (its shards would all be sent twice);
    a gate the same. Aged on the database's clock, they become candidates only after `age_s`."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with _wrong_clock(-SKEW), session_scope(engine) as s:
        job = _job(s)
        base = store.get_or_create_base_model(s, "tiny", "/tmp/tiny")
        adapter, _ = store.register_adapter(s, name="fam", path="/tmp/a", method="lora", sha256="0" * 64,
                                            base_model_id=base.id)
        suite, _ = store.add_suite(s, name="suite", version=1, spec={}, sha256="1" * 64)
        gate = store.create_gate_run(s, candidate_id=adapter.id, suite_id=suite.id, alpha=0.05, min_effect=0.01)
    with session_scope(engine) as s:
        assert store.queued_shards_older_than(s, 60) == []
        assert store.queued_gate_ids_older_than(s, 60) == []
        assert len(store.queued_shards_older_than(s, 0)) == len(store.job_shards(s, job.id))
        assert store.queued_gate_ids_older_than(s, 0) == [gate.id]
    engine.dispose()


def test_db_now_is_the_servers_clock_on_postgres(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with _wrong_clock(SKEW), session_scope(engine) as s:
        shown = db_now(s)
    assert abs(shown - datetime.now(timezone.utc)) < timedelta(seconds=30)
    engine.dispose()
