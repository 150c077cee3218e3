"""Store functions on both dialects: registration without duplicates, shard lifecycle, idempotent upserts,
aggregates, leaderboard, run diff, cancellation."""
from __future__ import annotations

import pytest

from services.db import store
from services.db.session import make_engine, session_scope


def _dataset(s, n: int = 10, h: str = "h1") -> store.DatasetInfo:
    samples = [{"id": f"s{i}", "prompt": "q", "choices": ["a", "b"], "answer": i % 2} for i in range(n)]
    ds, created = store.register_dataset(s, name="toy", split="val", content_hash=h, task_type="mc", source="test",
                                         samples=samples)
    return ds


def _job(s, n: int = 10, shard: int = 4, keys=("ft", "tad(alpha=1.0,beta=0.0)")) -> store.JobInfo:
    base = store.get_or_create_base_model(s, "tiny", "/tmp/tiny")
    ds = _dataset(s, n)
    ranges = [(a, min(a + shard, n)) for a in range(0, n, shard)]
    runs = [store.RunSpec(k.split("(")[0], {}, k, "hash-" + k) for k in keys]
    return store.create_job(s, spec={"base": "tiny"}, submitted_by="me", base_model_id=base.id, adapter_id=None,
                            dataset_id=ds.id, n_samples=n, runs=runs, shard_ranges=ranges)


def _rows(run_id: int, idx: range, correct) -> list[dict]:
    return [{"run_id": run_id, "sample_index": i, "sample_id": f"s{i}", "pred": 0, "scores": [-1.0, -2.0],
             "correct": correct(i), "correct_norm": correct(i), "latency_s": 0.1, "tokens": 1,
             "kv": {"kl": 0.5, "top": [1, 2]}, "vs_ft": None} for i in idx]


def test_registration_is_deduplicated(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        a = _dataset(s, h="same")
        b, created = store.register_dataset(s, name="toy", split="val", content_hash="same", task_type="mc",
                                            source="x", samples=[])
        assert b.id == a.id and not created
        c = _dataset(s, h="other")
        assert c.version == 2 and c.id != a.id
        assert [x["id"] for x in store.load_samples(s, a.id, 2, 5)] == ["s2", "s3", "s4"]
        base = store.get_or_create_base_model(s, "tiny", "/p")
        ad1, new1 = store.register_adapter(s, name="lora", path="/a", method="lora", sha256="w1", base_model_id=base.id)
        ad1b, new1b = store.register_adapter(s, name="lora", path="/a2", method="lora", sha256="w1",
                                             base_model_id=base.id)
        ad2, _ = store.register_adapter(s, name="lora", path="/b", method="lora", sha256="w2", base_model_id=base.id)
        assert new1 and not new1b and ad1b.id == ad1.id and ad2.version == 2
        store.promote_adapter(s, "lora", 1)
        store.promote_adapter(s, "lora", 2)
        assert store.promoted_adapter(s, "lora").version == 2
        assert [a.promoted for a in store.list_adapters(s, "lora")] == [False, True]
        assert store.find_adapter(s, "lora").version == 2
    engine.dispose()


def test_shard_lifecycle_upserts_aggregates_and_diff(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        job = _job(s)
        ft, tad = store.job_runs(s, job.id)
        assert [sh.stop - sh.start for sh in store.job_shards(s, job.id)] == [4, 4, 2]
    for start, stop in [(0, 4), (4, 8), (8, 10)]:
        with session_scope(engine) as s:
            claim = store.claim_shard(s, job.id, start, "w1", max_attempts=3)
            assert claim.action == "run"
            for _ in range(2):  # a redelivered batch writes the same rows again: no duplicates
                store.upsert_sample_results(s, _rows(ft.id, range(start, stop), lambda i: i % 2 == 0))
                store.upsert_sample_results(s, _rows(tad.id, range(start, stop), lambda i: i < 7))
            store.shard_progress(s, claim.shard.id, stop - start)
            store.refresh_aggregates(s, [ft.id, tad.id])
            info = store.finish_shard(s, claim.shard.id, "done")
    assert info.status == "done" and info.samples_done == 10 and info.shards_done == 3
    with session_scope(engine) as s:
        assert store.claim_shard(s, job.id, 0, "w2", 3).action == "done"  # finished shards are never recomputed
        assert store.count_sample_rows(s, [ft.id, tad.id]) == 20
        board = {r.key: r for r in store.leaderboard(s, job_ids=[job.id])}
        assert board["ft"].acc == pytest.approx(0.5) and board["ft"].n == 10
        t = board["tad(alpha=1.0,beta=0.0)"]
        # tad right on 0..6, ft right on evens: tad fixes 1,3,5 and breaks 8
        assert t.acc == pytest.approx(0.7) and (t.fixed, t.broken) == (3, 1)
        assert t.mcnemar_p == pytest.approx(0.625)
        assert t.acc_stderr == pytest.approx((0.7 * 0.3 / 9) ** 0.5)
        assert t.metrics["kv.kl"] == pytest.approx(0.5)
        diff = store.run_diff(s, tad.id, ft.id)
        assert (diff.both_right, diff.a_only, diff.b_only, diff.both_wrong) == (4, 3, 1, 2)
        assert [r.sample_index for r in diff.rows] == [1, 3, 5, 8]


def test_a_failed_holder_does_not_requeue_the_attempt_that_replaced_it(migrated_url: str) -> None:
    """Worker w's attempt was taken for dead (a sweep) and w2 runs the shard now; w's late failure report used to
    put w2's running attempt back to queued, so a third process would run it beside w2."""
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        job = _job(s, n=4, shard=4, keys=("ft",))
        first = store.claim_shard(s, job.id, 0, "w", max_attempts=3)
    with session_scope(engine) as s:
        second = store.claim_shard(s, job.id, 0, "w2", max_attempts=3, holder_alive=lambda w, sh: False)
        assert (second.action, second.shard.attempts) == ("run", 2)
    with session_scope(engine) as s:
        late = store.release_shard(s, first.shard.id, "RuntimeError: boom", "w", first.shard.attempts)
        assert (late.status, late.worker, late.attempts) == ("running", "w2", 2)
        own = store.release_shard(s, second.shard.id, "RuntimeError: boom", "w2", second.shard.attempts)
        assert (own.status, own.error) == ("queued", "RuntimeError: boom")


def test_poisoned_shard_is_capped_and_job_is_partial(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        job = _job(s, n=8, shard=4, keys=("ft",))
    for attempt in range(2):
        with session_scope(engine) as s:
            claim = store.claim_shard(s, job.id, 4, "w", max_attempts=2)
            assert claim.action == "run" and claim.shard.attempts == attempt + 1
            store.release_shard(s, claim.shard.id, "RuntimeError: boom", "w", claim.shard.attempts)
    with session_scope(engine) as s:
        claim = store.claim_shard(s, job.id, 4, "w", max_attempts=2)
        assert claim.action == "failed" and "gave up after 2 attempts" in claim.shard.error and "boom" in claim.shard.error
        c0 = store.claim_shard(s, job.id, 0, "w", max_attempts=2)
        info = store.finish_shard(s, c0.shard.id, "done")
    assert info.status == "partial" and "boom" in info.error and info.shards_failed == 1


def test_cancel_stops_queued_shards(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        job = _job(s, n=12, shard=4, keys=("ft",))
        running = store.claim_shard(s, job.id, 0, "w", 3)
    with session_scope(engine) as s:
        info = store.request_cancel(s, job.id)
        assert info.status == "running" and store.cancel_requested(s, job.id)
        assert store.claim_shard(s, job.id, 4, "w", 3).action == "cancelled"
        info = store.finish_shard(s, running.shard.id, "cancelled")
    assert info.status == "cancelled"


def test_heartbeats(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        store.heartbeat(s, "w@host", 12)
        store.heartbeat(s, "w@host", 13, job_id=1, shard_id=2)
    with session_scope(engine) as s:
        (w,) = store.list_workers(s, seen_within_s=60)
        assert (w.pid, w.job_id, w.shard_id) == (13, 1, 2)


def test_aggregates_count_mc_ties_and_unparsed_generations(migrated_url: str) -> None:
    """`ties`: MC rows whose every choice was -inf (tie-break); `unparsed`: generated rows with no extraction."""
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        job = _job(s, n=6, shard=6)
        ft, tad = store.job_runs(s, job.id)
        rows = _rows(ft.id, range(6), lambda i: True)
        tie_rows = [r | {"run_id": tad.id, "scores": [None, None], "tie": i < 4} for i, r in enumerate(rows)]
        gen_rows = [{"run_id": ft.id, "sample_index": i, "sample_id": f"s{i}", "output": "out",
                     "extracted": None if i in (1, 2, 5) else "x", "correct": i == 0} for i in range(6)]
        store.upsert_sample_results(s, tie_rows + gen_rows)
        store.refresh_aggregates(s, [ft.id, tad.id])
        aggs = {r.key: r.metrics for r in store.leaderboard(s, job_ids=[job.id])}
        assert aggs["tad(alpha=1.0,beta=0.0)"]["ties"] == 4 and "unparsed" not in aggs["tad(alpha=1.0,beta=0.0)"]
        assert aggs["ft"]["unparsed"] == 3 and "ties" not in aggs["ft"]
    engine.dispose()


def test_one_name_version_rule_for_every_reference() -> None:
    """`NAME:VERSION` is parsed by services.refs alone: the gate, the promote command and --adapter agree."""
    from services.refs import RefError, parse_ref

    assert parse_ref("fam:3", "adapter") == ("fam", 3)
    assert parse_ref(" fam:latest ", "adapter") == ("fam", None) and parse_ref("fam", "suite") == ("fam", None)
    for bad in ("fam:0", "fam:x", ":2"):
        with pytest.raises(RefError, match="adapter"):
            parse_ref(bad, "adapter")
