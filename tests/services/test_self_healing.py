"""Workers that heal themselves, with real components: `tad worker` subprocesses, a private Redis, Postgres.

- A pool child killed with SIGKILL (an OOM kill, a segfault) is replaced and the SAME worker finishes the job: the
  replacement child reports itself up before its torch import (services.tasks), so Celery does not kill it.
- A whole worker killed (main process and children): another worker's periodic sweep (services.heartbeat ->
  services.queueing.sweep_dead_workers) requeues its shard once its heartbeat is stale; nobody runs `tad requeue`.
- Several sweepers racing on one dead shard send exactly one message.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import redis

from services.db import store
from services.db.session import session_scope
from services.planning import plan_job
from services.queueing import broker_epoch_key, sweep_dead_workers
from services.submit_request import SubmitRequest
from tests.services.helpers import write_mc_dataset
from tests.services.test_fault_tolerance import _assert_complete, _shards, _submit, _wait, _wait_finished

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def _children(pid: int) -> set[int]:
    """Pids of the direct children of `pid` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _running_with_progress(settings, job_id: int) -> store.ShardInfo | None:  # noqa: ANN001
    return next((x for x in _shards(settings, job_id) if x.status == "running" and x.samples_done >= 2), None)


def test_sigkilled_child_is_replaced_and_the_same_worker_finishes(service: dict) -> None:
    settings = service["settings"]
    job_id = _submit(service, 24)
    a = service["start_worker"]("a")
    shard = _wait(lambda: _running_with_progress(settings, job_id), 120, "a shard mid-way", service)
    host, _, pid = shard.worker.rpartition(":")
    assert host == socket.gethostname() and int(pid) in _children(a.proc.pid)
    os.kill(int(pid), signal.SIGKILL)  # the pool child only; the worker's main process lives on
    job = _wait_finished(service, job_id, timeout=150)
    assert job.status == "done", job.error
    _assert_complete(settings, job_id, 24)
    assert a.proc.poll() is None  # the same worker did it, no new worker, no `tad requeue`
    after = {x.start: x for x in _shards(settings, job_id)}[shard.start]
    assert after.attempts == 2 and after.worker != shard.worker and after.status == "done"
    log = a.log.read_text(errors="replace")
    assert "Timed out waiting for UP message" not in log  # the replacement child was not killed at start-up
    assert f"worker process {shard.worker} was lost" in log  # the death is logged when the shard is taken over


def test_dead_worker_shard_is_requeued_by_another_workers_sweep(service: dict) -> None:
    settings = service["settings"]
    # dead after 3 x 0.5 s, swept every 0.5 s; the default visibility timeout (the fixture's 8 s would let Redis
    # redeliver the dead worker's message by itself, which is not what this test is about)
    fast = {"TAD_HEARTBEAT_INTERVAL": "0.5", "TAD_VISIBILITY_TIMEOUT": "3600"}
    a, b = service["start_worker"]("a", **fast), service["start_worker"]("b", **fast)

    def both_beating() -> bool:
        with session_scope(settings) as s:
            pids = {w.pid for w in store.list_workers(s, seen_within_s=2)}
        return bool(pids & _children(a.proc.pid)) and bool(pids & _children(b.proc.pid))

    _wait(both_beating, 90, "both workers beating", service)
    # and swept once: the first sweep on a fresh broker sets its marker key (and would send the queued shards of
    # open jobs again, a harmless duplicate that could take this shard over before the sweep we measure)
    client = redis.Redis.from_url(service["redis"].url)
    _wait(lambda: client.exists(broker_epoch_key(settings)), 30, "the broker marker", service)
    job_id = _submit(service, 24, shard_size=8)

    def a_mid_shard() -> store.ShardInfo | None:
        pids = {str(p) for p in _children(a.proc.pid)}
        return next((x for x in _shards(settings, job_id) if x.status == "running" and x.samples_done >= 2
                     and x.worker.rpartition(":")[2] in pids), None)

    shard = _wait(a_mid_shard, 120, "worker a mid-shard", service)
    a.kill()  # main process and children, like a machine dying; its message stays unacked in Redis
    killed_at = time.monotonic()

    def taken_over() -> store.ShardInfo | None:
        x = {y.start: y for y in _shards(settings, job_id)}[shard.start]
        return x if x.attempts == 2 and x.status in ("running", "done") else None

    _wait(taken_over, 30, "the dead worker's shard taken over", service)
    recovered_s = time.monotonic() - killed_at
    # stale after 1.5 s, swept within 0.5 s; the rest is the claim. The visibility timeout is an hour.
    assert recovered_s < 1.5 + 2 * 0.5 + 2.5, recovered_s
    job = _wait_finished(service, job_id, timeout=120)
    assert job.status == "done", job.error
    _assert_complete(settings, job_id, 24)
    assert {x.start: x for x in _shards(settings, job_id)}[shard.start].attempts == 2
    assert "stopped beating" in b.log.read_text(errors="replace")


def test_racing_sweepers_requeue_a_dead_shard_once(service: dict) -> None:
    """Eight sweepers at once on a shard whose worker is gone: one conditional UPDATE wins, one message is sent."""
    settings = service["settings"].model_copy(update={"heartbeat_interval": 0.2})
    data = write_mc_dataset(service["tmp"] / "race.jsonl", 4)
    req = SubmitRequest(dataset=str(data), base=str(service["model"]), strategies=["ft"], shard_size=4)
    job_id = plan_job(req, settings).job.id
    with session_scope(settings) as s:
        claim = store.claim_shard(s, job_id, 0, "gone-host:1", settings.max_redeliveries)
        assert claim.action == "run"
    time.sleep(1.0)  # > 3 x 0.2 s without a beat from gone-host:1
    results: list[list] = []
    barrier = threading.Barrier(8)

    def sweeper() -> None:
        barrier.wait()
        results.append(sweep_dead_workers(settings))

    threads = [threading.Thread(target=sweeper) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(len(r) for r in results) == [0] * 7 + [1]
    assert redis.Redis.from_url(service["redis"].url).llen(settings.queue) == 1
    (shard,) = _shards(settings, job_id)
    assert shard.status == "queued" and shard.attempts == 1 and "stopped beating" in shard.error
    assert sweep_dead_workers(settings) == []  # nothing left to do: idempotent
    assert redis.Redis.from_url(service["redis"].url).llen(settings.queue) == 1


def test_claim_rules_for_a_running_shard(migrated_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    """A second message for a shard a live process runs is dropped (`busy`); a dead holder's shard is taken over
    with the loss recorded; the same process re-claiming after a database failure in its last step starts no new
    attempt."""
    from services.settings import Settings

    settings = Settings(database_url=migrated_url, model_roots=[tiny_model_dir.parent.parent, tmp_path])
    data = write_mc_dataset(tmp_path / "claims.jsonl", 4)
    job_id = plan_job(SubmitRequest(dataset=str(data), base=str(tiny_model_dir), strategies=["ft"], shard_size=4),
                      settings).job.id
    with session_scope(settings) as s:
        assert store.claim_shard(s, job_id, 0, "h:1", 3).shard.attempts == 1
    with session_scope(settings) as s:
        again = store.claim_shard(s, job_id, 0, "h:1", 3)  # same process: its last step failed on the DB
        assert (again.action, again.shard.attempts) == ("run", 1)
    with session_scope(settings) as s:
        busy = store.claim_shard(s, job_id, 0, "h:2", 3, holder_alive=lambda w, sh: w == "h:1")
        assert (busy.action, busy.shard.attempts, busy.shard.worker) == ("busy", 1, "h:1")
    with session_scope(settings) as s:
        taken = store.claim_shard(s, job_id, 0, "h:2", 3, holder_alive=lambda w, sh: False)
        assert (taken.action, taken.shard.attempts, taken.shard.worker) == ("run", 2, "h:2")
        assert "worker process h:1 was lost" in taken.shard.error



def test_two_processes_reading_one_queued_shard_run_it_once(migrated_url: str, tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    """Process B reads the queued shard, process A claims and commits it, then B writes its claim. On SQLite
    nothing locked B's read, and B's plain UPDATE used to succeed: two concurrent attempts, one lost count. The
    claim is now a compare-and-set, so B gets `busy` on both dialects (on Postgres B waits on the row lock)."""
    from sqlalchemy import event

    from services.db.session import make_engine
    from services.settings import Settings

    settings = Settings(database_url=migrated_url, model_roots=[tiny_model_dir.parent.parent, tmp_path])
    data = write_mc_dataset(tmp_path / "race.jsonl", 4)
    job_id = plan_job(SubmitRequest(dataset=str(data), base=str(tiny_model_dir), strategies=["ft"], shard_size=4),
                      settings).job.id
    engine_a, engine_b = make_engine(migrated_url), make_engine(migrated_url)
    claims: dict[str, store.ShardClaim] = {}

    def a_claims_first(conn, cursor, statement, *_args) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("UPDATE SHARDS") and "a" not in claims:
            with session_scope(engine_a) as s:
                claims["a"] = store.claim_shard(s, job_id, 0, "host:a", 3)

    if engine_b.dialect.name == "postgresql":  # B's row lock would block A: let A claim before B reads
        with session_scope(engine_a) as s:
            claims["a"] = store.claim_shard(s, job_id, 0, "host:a", 3)
    else:
        event.listen(engine_b, "before_cursor_execute", a_claims_first)
    with session_scope(engine_b) as s:
        claims["b"] = store.claim_shard(s, job_id, 0, "host:b", 3, holder_alive=lambda w, sh: w == "host:a")
    engine_a.dispose()
    engine_b.dispose()
    assert claims["a"].action == "run" and claims["b"].action == "busy", claims
    with session_scope(settings) as s:
        (shard,) = store.job_shards(s, job_id)
    assert (shard.status, shard.worker, shard.attempts) == ("running", "host:a", 1)

def test_redis_restart_without_its_data_mid_job(service: dict) -> None:
    """The broker restarts empty (no persistence, or its disk lost): the queued shards' messages are gone. The
    workers' sweep notices the missing marker key and sends the queued shards again; nobody runs `tad requeue`."""
    settings = service["settings"]
    job_id = _submit(service, 24)
    service["start_worker"]("a", TAD_HEARTBEAT_INTERVAL="0.5")
    _wait(lambda: sum(x.status == "done" for x in _shards(settings, job_id)) >= 1, 90, "first shard", service)
    redis_server = service["redis"]
    redis.Redis.from_url(redis_server.url).set("test:sentinel", 1)  # no worker writes it: it shows the data went
    redis_server.stop()
    for f in redis_server.workdir.rglob("*"):
        if f.is_file():
            f.unlink()  # its data is gone
    redis_server.start()
    # dbsize() would race the workers, which reconnect at once and write their own keys again
    assert not redis.Redis.from_url(redis_server.url).exists("test:sentinel")
    job = _wait_finished(service, job_id, timeout=120)
    assert job.status == "done", job.error
    _assert_complete(settings, job_id, 24)
    assert "the broker lost its data" in service["workers"][0].log.read_text(errors="replace")


def test_a_shard_its_live_worker_no_longer_runs_is_swept(migrated_url: str) -> None:
    """A process that beats but reports another shard (or none) no longer runs the shard it holds (its end was
    never recorded): once started longer than `dead_after` ago, the shard is stale like a dead worker's."""
    from services.settings import Settings
    from services.shard_runner import _holder_alive

    settings = Settings(database_url=migrated_url, heartbeat_interval=0.1)  # dead after 0.3 s
    with session_scope(settings) as s:
        dataset, _ = store.register_dataset(s, name="d", split="val", content_hash="h", task_type="mc", source="x",
                                            samples=[{"id": "a", "prompt": "p", "choices": ["x", "y"], "answer": 0}])
        base = store.get_or_create_base_model(s, "b", "/b", "f")
        job = store.create_job(s, spec={}, submitted_by="", base_model_id=base.id, adapter_id=None,
                               dataset_id=dataset.id, n_samples=1, runs=[store.RunSpec("ft", {}, "ft", "h")],
                               shard_ranges=[(0, 1)])
        shard = store.claim_shard(s, job.id, 0, "elsewhere:1", 3).shard
    time.sleep(0.5)
    for working_on, stale in ((shard.id, False), (None, True), (shard.id + 1, True)):
        with session_scope(settings) as s:
            store.heartbeat(s, "elsewhere:1", 1, job.id if working_on else None, working_on)  # a fresh beat
        with session_scope(settings) as s:
            assert bool(store.stale_running_shards(s, settings.dead_after_s)) is stale, working_on
            assert _holder_alive(s, settings)("elsewhere:1", shard.id) is (not stale)


def test_queued_shards_whose_messages_are_gone_are_sent_again(service: dict) -> None:
    """A job stored but never sent (its planning process died between the two) used to wait for ever. The
    orphan check sends exactly the queued shards the broker holds no message for, at most once per
    `orphan_after` in the deployment, and counts a delivered but unacknowledged message as held."""
    from kombu import Connection, Consumer, Queue

    from services.broker_messages import pending_tasks
    from services.queueing import recover_orphans

    settings = service["settings"].model_copy(update={"orphan_after": 1.0})
    sent_job = _submit(service, 8, name="sent")  # its 2 shard messages wait in the queue (no worker runs)
    lost_job = _submit(service, 12, name="lost", enqueue=False)  # 3 shards, no message
    time.sleep(1.1)
    first = recover_orphans(settings)
    assert sorted(first["shards"]) == [(lost_job, 0, 4), (lost_job, 4, 8), (lost_job, 8, 12)], first
    assert recover_orphans(settings) == {"shards": [], "gates": []}  # checked within orphan_after: skipped
    held = pending_tasks(settings)
    assert {("tad.run_shard", (j, a, a + 4)) for j, n in ((sent_job, 8), (lost_job, 12)) for a in range(0, n, 4)} \
        <= held

    # a message delivered to a consumer and not acknowledged (a worker's prefetched or ETA'd retry) still counts
    with Connection(settings.broker_url) as conn:
        got: list = []
        consumer = Consumer(conn, [Queue(settings.queue, no_declare=True)], callbacks=[lambda b, m: got.append(m)],
                            no_ack=False, prefetch_count=1)
        with consumer:
            conn.drain_events(timeout=5)
            assert len(got) == 1 and got[0].headers["task"] == "tad.run_shard"
            assert pending_tasks(settings) == held  # the delivered one moved to the unacked set, still seen
            time.sleep(1.1)
            assert recover_orphans(settings) == {"shards": [], "gates": []}  # nothing lost: nothing sent

    # a worker started now finishes both jobs, each shard in one attempt (the re-sent messages are not duplicated)
    service["start_worker"]("a", TAD_ORPHAN_AFTER="1", TAD_HEARTBEAT_INTERVAL="0.5")
    for job_id, n in ((sent_job, 8), (lost_job, 12)):
        assert _wait_finished(service, job_id, timeout=180).status == "done"
        _assert_complete(settings, job_id, n)
        assert {x.attempts for x in _shards(settings, job_id)} == {1}


def test_a_job_stored_but_never_sent_finishes_without_anyone(service: dict) -> None:
    """The planning process died after storing the job: no message, no person. The workers' orphan check sends
    the shards once they are `orphan_after` old."""
    service["start_worker"]("a", TAD_ORPHAN_AFTER="2", TAD_HEARTBEAT_INTERVAL="0.5")
    # the first sweep on a fresh broker sets its marker key and sends every queued shard (recover_lost_queue):
    # submit after it, so that only the orphan check can send this job
    client = redis.Redis.from_url(service["redis"].url)
    _wait(lambda: client.exists(broker_epoch_key(service["settings"])), 60, "the broker marker", service)
    job_id = _submit(service, 8, name="never-sent", enqueue=False)
    job = _wait_finished(service, job_id, timeout=180)
    assert job.status == "done", job.error
    _assert_complete(service["settings"], job_id, 8)
    assert {x.attempts for x in _shards(service["settings"], job_id)} == {1}


def test_embedded_jobs_in_threads_of_one_process_are_not_taken_for_abandoned(
        migrated_url: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard runs jobs in threads of its process. They shared one worker name and one heartbeat slot, so
    the heartbeat named one thread's shard and a sweep saw the other thread's running shard as given up (`beats
    but reports another shard`) and requeued it while it ran. Each embedded job now beats as a lane of its own."""
    from services.settings import Settings
    from services.shard_runner import run_job_embedded

    monkeypatch.setenv("TAD_ENABLE_TEST_FAULTS", "1")
    monkeypatch.setenv("TAD_TEST_BATCH_DELAY", "0.6")  # 4 batches: each shard runs > dead_after_s (1.5 s)
    settings = Settings(database_url=migrated_url, model_roots=[tiny_model_dir.parent.parent, tmp_path],
                        heartbeat_interval=0.5)
    jobs = [plan_job(SubmitRequest(dataset=str(write_mc_dataset(tmp_path / f"t{i}.jsonl", 8)),
                                   base=str(tiny_model_dir), strategies=["ft"], shard_size=8,
                                   config={"batch_size": 2}), settings).job.id for i in range(2)]
    threads = [threading.Thread(target=run_job_embedded, args=(j, settings)) for j in jobs]
    for t in threads:
        t.start()
    taken_for_abandoned: list[tuple[store.ShardInfo, store.WorkerInfo]] = []
    while any(t.is_alive() for t in threads):
        with session_scope(settings) as s:
            beating = {w.worker: w for w in store.list_workers(s, seen_within_s=settings.dead_after_s)}
            # a stale shard whose worker beats on time: its heartbeat names another shard (a slow beat on a loaded
            # machine would be a different, timing-dependent cause, and is not what this test is about)
            taken_for_abandoned += [(sh, beating[sh.worker]) for sh in
                                    store.stale_running_shards(s, settings.dead_after_s) if sh.worker in beating]
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert taken_for_abandoned == []
    names = {j: {sh.worker for sh in _shards(settings, j)} for j in jobs}
    assert all(len(n) == 1 for n in names.values()) and names[jobs[0]] != names[jobs[1]], names
    assert all(sh.status == "done" and sh.attempts == 1 for j in jobs for sh in _shards(settings, j))
