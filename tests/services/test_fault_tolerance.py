"""Fault tolerance with real components: `tad worker` (Celery prefork) subprocesses, a private Redis, Postgres.

The model is the tiny random Llama + LoRA (fast). `TAD_TEST_BATCH_DELAY` (test-only, see services/fault_hooks.py) makes
each batch take ~0.3 s so a job can be interrupted mid-way; `tad_test_raise` sample metadata (test-only, gated
by TAD_ENABLE_TEST_FAULTS) makes a poisoned shard.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest
from sqlalchemy import create_engine, text

from services.db import store
from services.db.schema import upgrade
from services.db.session import session_scope
from services.planning import plan_job
from services.queueing import enqueue_job
from services.settings import Settings
from services.shard_runner import run_job_embedded
from services.submit_request import SubmitRequest
from tests.services.helpers import tad_cli, write_mc_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STRATEGIES = ["ft", "tad:alpha=1"]


def _submit(service: dict, n: int, *, name: str = "d", poison: set[int] = frozenset(), shard_size: int = 4,
            strategies: list[str] = STRATEGIES, enqueue: bool = True, meta: dict[int, dict] | None = None) -> int:
    data = write_mc_dataset(service["tmp"] / f"{name}.jsonl", n, poison, meta)
    req = SubmitRequest(dataset=str(data), base=str(service["model"]), adapter=str(service["lora"]),
                        strategies=strategies, config={"batch_size": 2}, shard_size=shard_size)
    plan = plan_job(req, service["settings"])
    if enqueue:
        enqueue_job(plan.job.id, service["settings"])
    return plan.job.id


def _job(settings: Settings, job_id: int) -> store.JobInfo:
    with session_scope(settings) as s:
        return store.get_job(s, job_id)


def _shards(settings: Settings, job_id: int) -> list[store.ShardInfo]:
    with session_scope(settings) as s:
        return store.job_shards(s, job_id)


def _wait(cond: Callable[[], Any], timeout: float, what: str, service: dict) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    logs = "\n".join(f"--- {w.name}\n{w.tail()}" for w in service["workers"])
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _wait_finished(service: dict, job_id: int, timeout: float = 150) -> store.JobInfo:
    return _wait(lambda: (j := _job(service["settings"], job_id)).finished and j, timeout, f"job {job_id}", service)


def _assert_complete(settings: Settings, job_id: int, n: int) -> None:
    """Every (run, sample) row exactly once."""
    with session_scope(settings) as s:
        runs = store.job_runs(s, job_id)
        for r in runs:
            rows = store.sample_rows(s, r.id)
            assert [x["sample_index"] for x in rows] == list(range(n)), r.key
    engine = create_engine(settings.database_url)
    with engine.connect() as c:
        dup = c.execute(text("SELECT count(*) FROM (SELECT run_id, sample_index FROM sample_results "
                             "GROUP BY run_id, sample_index HAVING count(*) > 1) d")).scalar()
    engine.dispose()
    assert dup == 0


def test_sigkill_worker_mid_job(service: dict) -> None:
    settings = service["settings"]
    job_id = _submit(service, 32)
    a = service["start_worker"]("a")
    # wait until some shards are finished and one is half-way through (rows of it already stored)
    _wait(lambda: (sh := _shards(settings, job_id)) and sum(x.status == "done" for x in sh) >= 2
          and any(x.status == "running" and x.samples_done >= 2 for x in sh), 90, "a shard mid-way", service)
    a.kill()
    before = {x.start: x for x in _shards(settings, job_id)}
    killed = [x.start for x in before.values() if x.status == "running"]
    assert len(killed) == 1
    service["start_worker"]("b")
    job = _wait_finished(service, job_id)
    assert job.status == "done", job.error
    _assert_complete(settings, job_id, 32)
    after = {x.start: x for x in _shards(settings, job_id)}
    for start, shard in before.items():
        if shard.status == "done":  # finished shards are not recomputed
            assert (after[start].attempts, after[start].finished_at) == (1, shard.finished_at)
    assert after[killed[0]].attempts == 2 and after[killed[0]].status == "done"


def test_busy_worker_keeps_beating_with_its_shard(service: dict) -> None:
    """A worker process beats every TAD_HEARTBEAT_INTERVAL while a shard runs (not only at shard start and end),
    reporting that shard, and reports itself idle once the job is done."""
    settings = service["settings"]
    job_id = _submit(service, 24, shard_size=24)  # one shard of 12 batches x ~0.3 s
    service["start_worker"]("a", TAD_HEARTBEAT_INTERVAL="0.5")

    def beat_on_shard() -> store.WorkerInfo | None:
        with session_scope(settings) as s:
            return next((w for w in store.list_workers(s) if w.job_id == job_id), None)

    first = _wait(beat_on_shard, 90, "a heartbeat naming the job", service)
    later = _wait(lambda: (w := beat_on_shard()) and w.last_seen > first.last_seen and w, 30, "a later beat", service)
    shard = _shards(settings, job_id)[0]
    assert later.shard_id == shard.id and later.pid == first.pid
    assert shard.status == "running" and not _job(settings, job_id).finished  # beats came in mid-shard
    assert _wait_finished(service, job_id).status == "done"
    idle = _wait(lambda: (w := _worker(settings, later.worker)) and w.job_id is None and w, 10, "an idle beat", service)
    assert idle.last_seen > later.last_seen


def _worker(settings: Settings, name: str) -> store.WorkerInfo | None:
    with session_scope(settings) as s:
        return next((w for w in store.list_workers(s) if w.worker == name), None)


def _tad_requeue(service: dict, job_id: int) -> str:
    """The real CLI, with the deployment's heartbeat interval (it decides when a worker counts as silent)."""
    res = tad_cli({**service["env"], "TAD_HEARTBEAT_INTERVAL": "1.0"}, "requeue", str(job_id), timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_requeue_after_the_broker_lost_the_shards(service: dict) -> None:
    """`tad requeue` sends again what a broker lost: queued shards, and a running shard whose worker stopped
    beating; a shard whose worker is alive is left alone. The job then completes with every row exactly once."""
    import redis

    from services.queueing import broker_epoch_key

    settings = service["settings"]
    # The broker has been up all along (its marker is there): a worker's first sweep leaves the queue alone, so
    # only `tad requeue` can send the lost job (a broker that lost its marker is test_redis_restart_mid_job's case).
    redis.Redis.from_url(settings.broker_url).set(broker_epoch_key(settings), "test")
    lost = _submit(service, 12, name="lost", enqueue=False)  # stored, never reached the broker (as after a flush)
    # 0.5 s per sample: the busy shard is still running while the CLI calls below take their seconds on a loaded
    # machine (unslowed, the tiny model finished all 24 samples before the kill)
    busy = _submit(service, 24, name="busy", shard_size=24, meta={i: {"tad_test_sleep": 0.5} for i in range(24)})
    # heartbeats every 1 s, silent after 3 s: slack for a loaded machine, where a live worker's beat can be late
    a = service["start_worker"]("a", TAD_HEARTBEAT_INTERVAL="1.0")
    _wait(lambda: (sh := _shards(settings, busy)[0]).status == "running" and sh.samples_done >= 2, 90,
          "the busy shard mid-way", service)
    assert _job(settings, lost).status == "queued"  # nothing will ever run it by itself
    assert f"job {busy}: 0 shard(s) sent" in _tad_requeue(service, busy)  # its worker is alive
    a.kill()
    # once the killed worker's last beat is older than 3 intervals its running shard is sent again (earlier calls
    # send nothing: requeue is safe to repeat)
    _wait(lambda: f"job {busy}: 1 shard(s) sent" in _tad_requeue(service, busy), 60,
          "the silent worker's shard requeued", service)
    assert f"job {lost}: 3 shard(s) sent" in _tad_requeue(service, lost)
    service["start_worker"]("b", TAD_HEARTBEAT_INTERVAL="1.0")
    for job_id, n in ((lost, 12), (busy, 24)):
        assert _wait_finished(service, job_id).status == "done"
        _assert_complete(settings, job_id, n)
    assert f"job {lost}: 0 shard(s) sent" in _tad_requeue(service, lost)  # a finished job has nothing to send


def test_redis_restart_mid_job(service: dict) -> None:
    settings = service["settings"]
    job_id = _submit(service, 24)
    service["start_worker"]("a")
    _wait(lambda: sum(x.status == "done" for x in _shards(settings, job_id)) >= 1, 90, "first shard", service)
    service["redis"].stop()
    time.sleep(2)
    service["redis"].start()
    job = _wait_finished(service, job_id)
    assert job.status == "done", job.error
    _assert_complete(settings, job_id, 24)


def test_postgres_backends_terminated_mid_job(service: dict) -> None:
    settings = service["settings"]
    job_id = _submit(service, 24)
    service["start_worker"]("a")
    _wait(lambda: sum(x.status == "done" for x in _shards(settings, job_id)) >= 1, 90, "first shard", service)
    dbname = settings.database_url.rsplit("/", 1)[1]
    admin = create_engine(settings.database_url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    killed = 0
    for _ in range(3):  # drop every connection of the job's database, three times while it runs
        with admin.connect() as c:
            killed += c.execute(text("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     "WHERE datname = :d AND pid <> pg_backend_pid()) t"), {"d": dbname}).scalar()
        time.sleep(1.0)
    admin.dispose()
    assert killed >= 1
    job = _wait_finished(service, job_id)
    assert job.status == "done", job.error
    _assert_complete(settings, job_id, 24)


def test_poisoned_shard_is_retried_bounded_then_failed(service: dict) -> None:
    settings = service["settings"]
    job_id = _submit(service, 16, meta={9: {"tad_test_fail_shard": "poisoned sample"}})
    service["start_worker"]("a")
    job = _wait_finished(service, job_id)
    assert job.status == "partial" and "poisoned sample" in (job.error or "")
    shards = {x.start: x for x in _shards(settings, job_id)}
    assert shards[8].status == "failed" and shards[8].attempts == settings.max_redeliveries
    assert "poisoned sample" in shards[8].error
    assert all(x.status == "done" for s, x in shards.items() if s != 8)
    with session_scope(settings) as s:  # partial results kept
        for r in store.job_runs(s, job_id):
            idx = [x["sample_index"] for x in store.sample_rows(s, r.id)]
            assert [i for i in idx if not 8 <= i < 12] == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]


def test_two_workers_three_jobs_match_embedded(service: dict, tmp_path: Path) -> None:
    settings = service["settings"]
    specs = [(16, "j1", ["ft", "tad:alpha=0.5,2"]), (12, "j2", ["ft", "base", "contrastive"]), (10, "j3", ["ft"])]
    jobs = [_submit(service, n, name=name, strategies=st) for n, name, st in specs]
    service["start_worker"]("a", TAD_TEST_BATCH_DELAY="0")
    service["start_worker"]("b", TAD_TEST_BATCH_DELAY="0")
    for j in jobs:
        assert _wait_finished(service, j).status == "done"
    # the same three jobs embedded, in-process on SQLite
    lite = Settings(database_url=f"sqlite:///{tmp_path / 'embedded.db'}", model_roots=settings.model_roots)
    upgrade(lite.database_url)
    for (n, name, st), pg_job in zip(specs, jobs):
        req = SubmitRequest(dataset=str(service["tmp"] / f"{name}.jsonl"), base=str(service["model"]),
                            adapter=str(service["lora"]), strategies=st, config={"batch_size": 2}, shard_size=4)
        plan = plan_job(req, lite)
        assert run_job_embedded(plan.job.id, lite).status == "done"
        with session_scope(settings) as s1, session_scope(lite) as s2:
            pg_runs = {r.key: r.id for r in store.job_runs(s1, pg_job)}
            lite_runs = {r.key: r.id for r in store.job_runs(s2, plan.job.id)}
            assert pg_runs.keys() == lite_runs.keys()
            for key in pg_runs:
                a, b = store.sample_rows(s1, pg_runs[key]), store.sample_rows(s2, lite_runs[key])
                assert len(a) == len(b) == n
                for x, y in zip(a, b):
                    assert (x["sample_id"], x["pred"], x["pred_norm"], x["correct"], x["vs_ft"]) == \
                           (y["sample_id"], y["pred"], y["pred_norm"], y["correct"], y["vs_ft"])
                    assert x["scores"] == pytest.approx(y["scores"], abs=1e-5)
            agg_pg = {r.key: (r.acc, r.acc_norm, r.n) for r in store.leaderboard(s1, job_ids=[pg_job])}
            agg_lite = {r.key: (r.acc, r.acc_norm, r.n) for r in store.leaderboard(s2, job_ids=[plan.job.id])}
            assert agg_pg == agg_lite
