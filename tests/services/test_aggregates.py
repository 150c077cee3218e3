"""Run aggregates from per-shard partial sums give the numbers of the Python reference (every row read), on both
dialects: rows written shard by shard, redelivered and resumed shards, the migration's backfill, cascades."""
from __future__ import annotations

import math
import random

import pytest
from sqlalchemy import delete, insert, select

from tad_core.metrics import mcnemar_p, proportion_stderr

from services.db import aggregates, store
from services.db.kv_stats import scalar_kv_stats
from services.db.models import Job, RunAggregate, SampleResult, ShardAggregate, utcnow
from services.db.schema import upgrade
from services.db.session import make_engine, session_scope

KEYS = ("ft", "base", "tad(alpha=1.0,beta=0.0)", "tad(alpha=2.0,beta=0.0)")


def _python_kv_means(session, run_ids):
    """The kv averaging as it was done in Python before (the reference the SQL must match)."""
    sums: dict[int, dict[str, list[float]]] = {r: {} for r in run_ids}
    for run_id, kv in session.execute(select(SampleResult.run_id, SampleResult.kv)
                                      .where(SampleResult.run_id.in_(run_ids), SampleResult.kv.is_not(None))):
        for k, v in (kv or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                acc = sums[run_id].setdefault(k, [0.0, 0.0])
                acc[0] += v
                acc[1] += 1
    return {(r, f"kv.{k}"): (t / n, None, int(n)) for r, st in sums.items() for k, (t, n) in st.items()}


def _kv(rng: random.Random, i: int):
    """kv values of every kind the column holds: floats, ints, booleans, lists, nested objects, nothing."""
    if i % 11 == 0:
        return None
    kv = {"kl_mean": rng.random() * 3, "js_mean": rng.random(), "steps": rng.randint(1, 64),
          "promoted": [[rng.randint(0, 50000), rng.random()] for _ in range(3)], "flag": i % 2 == 0,
          "label": "x", "nested": {"a": 1.5}}
    if i % 3 == 0:
        kv["h_f_max"] = -rng.random() * 1e6  # a key only some rows have
        kv["per_step"] = [{"token": 5, "kl": 0.25}]
    return kv


RANGES = [(0, 25), (25, 50), (50, 60)]  # uneven shards, the last one short


def _seed_rows(s, n: int = 60, ranges=RANGES):
    """Two jobs of four runs with shards `ranges` and their sample rows of every kind (base scored half the
    samples; the ft run has no flip rate), not stored yet. Returns (run ids by job, rows)."""
    base = store.get_or_create_base_model(s, "tiny", "/tmp/tiny")
    ds, _ = store.register_dataset(s, name="toy", split="val", content_hash="h", task_type="mc", source="test",
                                   samples=[{"id": f"s{i}", "prompt": "q", "choices": ["a", "b"], "answer": 0}
                                            for i in range(n)])
    jobs = []
    for j in range(2):
        job = store.create_job(s, spec={"base": "tiny"}, submitted_by="me", base_model_id=base.id, adapter_id=None,
                               dataset_id=ds.id, n_samples=n,
                               runs=[store.RunSpec(k.split("(")[0], {}, k, f"h{j}{k}") for k in KEYS],
                               shard_ranges=ranges)
        jobs.append(job)
    rng = random.Random(7)
    rows = []
    by_job: list[list[int]] = []
    for job in jobs:
        by_job.append([])
        for r in store.job_runs(s, job.id):
            by_job[-1].append(r.id)
            skill = rng.uniform(0.2, 0.8)
            for i in range(n if r.key != "base" else n // 2):
                gen = i % 5 == 0
                err = i % 17 == 0
                ok = None if err or i % 13 == 0 else rng.random() < skill
                rows.append({"run_id": r.id, "sample_index": i, "sample_id": f"s{i}",
                             "output": ("answer 7" if i % 2 else "???") if gen else None,
                             "extracted": ("7" if i % 2 else None) if gen else None,
                             "pred": None if gen else 0, "scores": None if gen else [-1.0, -2.5],
                             "correct": ok, "correct_norm": None if gen else ok,
                             "flip_rate": rng.random() if r.key != "ft" else None,
                             "tie": None if gen else i % 7 == 0, "latency_s": rng.random(),
                             "tokens": rng.randint(1, 40), "kv": _kv(rng, i), "error": "over budget" if err else None})
    return by_job, rows


def _store_shard(s, by_job, rows, start: int, stop: int) -> None:
    """What a worker does for shard [start, stop) of every job: upsert its rows, then store its partials."""
    store.upsert_sample_results(s, [r for r in rows if start <= r["sample_index"] < stop])
    for run_ids in by_job:
        aggregates.store_shard_partials(s, run_ids, start, stop)


def _reference(engine, run_ids) -> dict:
    """The Python reference's aggregates of `run_ids` (run_aggregates emptied before and after)."""
    with session_scope(engine) as s:
        s.execute(delete(RunAggregate))
        store.refresh_aggregates(s, run_ids)
        out = _table(s)
        s.execute(delete(RunAggregate))
    return out


def _refreshed(engine, run_ids) -> dict:
    with session_scope(engine) as s:
        s.execute(delete(RunAggregate))
        aggregates.refresh_aggregates(s, run_ids)
        return _table(s)


def _table(s):
    return {(r, m): (v, se, n) for r, m, v, se, n in s.execute(
        select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n))}


def _partials(s):
    return {(r, a, k): (t, n) for r, a, k, t, n in s.execute(
        select(ShardAggregate.run_id, ShardAggregate.start, ShardAggregate.name, ShardAggregate.total,
               ShardAggregate.n))}


def _same(a, b) -> bool:
    return a[2] == b[2] and all((x is None and y is None) or (x is not None and y is not None
                                                             and x == pytest.approx(y, rel=1e-9, abs=1e-12))
                                for x, y in zip(a[:2], b[:2]))


def _assert_equal_to_reference(new: dict, old: dict) -> None:
    assert set(new) == set(old)
    for key in old:
        assert _same(new[key], old[key]), (key, new[key], old[key])


def test_partials_give_the_python_reference(migrated_url: str) -> None:
    """Rows written shard by shard, each shard's partials stored as a worker stores them: the refresh from the
    partials equals the reference (metric names, values, stderr, n) and the Python kv means."""
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        by_job, rows = _seed_rows(s)
    for start, stop in RANGES:
        with session_scope(engine) as s:
            _store_shard(s, by_job, rows, start, stop)
    run_ids = [r for ids in by_job for r in ids]
    new = _refreshed(engine, run_ids)
    _assert_equal_to_reference(new, _reference(engine, run_ids))
    with session_scope(engine) as s:
        reference_kv = _python_kv_means(s, run_ids)
        partials = _partials(s)
    for key, want in reference_kv.items():
        assert _same(new[key], want), (key, new[key], want)
    ft, base = run_ids[0], run_ids[1]
    assert {a for r, a, _ in partials if r == base} == {0, 25}  # base has no rows in the last shard
    assert {a for r, a, _ in partials if r == ft} == {0, 25, 50}
    metrics = {m for r, m in new if r == base}
    # what the seed makes visible: scalar kv keys only (no bool, string, list or object), paired counts vs ft
    assert {"kv.kl_mean", "kv.js_mean", "kv.steps", "kv.h_f_max", "errors", "ties", "unparsed"} <= metrics
    assert not metrics & {"kv.flag", "kv.label", "kv.promoted", "kv.nested", "kv.per_step"}
    assert new[(base, "kv.h_f_max")][2] < new[(base, "kv.kl_mean")][2]  # n counts the rows that have the key
    assert new[(base, "fixed_vs_ft")][2] == sum(1 for i in range(30) if i % 17 and i % 13)  # scored by both
    assert (ft, "fixed_vs_ft") not in new and (ft, "flip_rate") not in new and (ft, "acc") in new
    assert new[(ft, "n")] == (60.0, None, 60)
    engine.dispose()


def test_redelivered_and_resumed_shards_are_not_counted_twice(migrated_url: str) -> None:
    """A shard stored twice (redelivery), a shard re-stored with changed rows (a key gone, values and verdicts
    changed, kv now NULL) and a shard resumed after a first attempt stored part of it: the partials are
    replaced, and the refresh still equals the reference."""
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        by_job, rows = _seed_rows(s)
    run_ids = [r for ids in by_job for r in ids]
    with session_scope(engine) as s:
        _store_shard(s, by_job, [r for r in rows if r["sample_index"] < 40], 25, 50)  # a first attempt: 15 of 25
    for start, stop in RANGES:
        with session_scope(engine) as s:
            _store_shard(s, by_job, rows, start, stop)  # [25, 50) resumed: all 25 samples now
    with session_scope(engine) as s:
        _store_shard(s, by_job, rows, 0, 25)  # redelivered: same rows again
    new = _refreshed(engine, run_ids)
    _assert_equal_to_reference(new, _reference(engine, run_ids))
    assert new[(run_ids[0], "n")] == (60.0, None, 60)

    changed = []
    for row in rows:
        if 25 <= row["sample_index"] < 50:
            kv = dict(row["kv"] or {"fresh": 1.0})
            kv.pop("kl_mean", None)
            kv["js_mean"] = 10.0 + row["sample_index"]
            row = {**row, "kv": None if row["sample_index"] % 4 == 1 else kv,
                   "correct": None if row["correct"] is None else not row["correct"]}
        changed.append(row)
    with session_scope(engine) as s:
        _store_shard(s, by_job, changed, 25, 50)
    again = _refreshed(engine, run_ids)
    _assert_equal_to_reference(again, _reference(engine, run_ids))
    ft = run_ids[0]
    assert again[(ft, "kv.kl_mean")][2] < new[(ft, "kv.kl_mean")][2]  # the removed key's partial is gone
    assert again[(ft, "kv.js_mean")][0] > new[(ft, "kv.js_mean")][0] + 5
    assert again[(ft, "acc")] != new[(ft, "acc")] and again[(ft, "n")] == new[(ft, "n")]
    engine.dispose()


def test_refresh_overwrites_and_ignores_other_runs(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        by_job, rows = _seed_rows(s, n=20, ranges=[(0, 10), (10, 20)])
        for start, stop in ((0, 10), (10, 20)):
            _store_shard(s, by_job, rows, start, stop)
        run_ids = by_job[0]
        aggregates.refresh_aggregates(s, run_ids[:2])
        before = _table(s)
        assert {r for r, _ in before} == set(run_ids[:2])
        s.execute(delete(SampleResult).where(SampleResult.run_id == run_ids[0], SampleResult.sample_index >= 10))
        aggregates.store_shard_partials(s, run_ids, 10, 20)
        aggregates.refresh_aggregates(s, run_ids[:1])
        aggregates.refresh_aggregates(s, [])
        after = _table(s)
    assert after[(run_ids[0], "n")][0] == 10.0 and before[(run_ids[0], "n")][0] == 20.0
    assert after[(run_ids[1], "n")] == before[(run_ids[1], "n")]
    engine.dispose()


def test_metrics_from_sums() -> None:
    """Each kind of metric from its sums; an empty base leaves the metric out, zero errors are not reported."""
    got = aggregates.metrics_from_sums({
        "n": (4.0, 4), "errors": (0.0, 4), "acc": (3.0, 4), "acc_norm": (0.0, 0), "tokens": (10.0, 4),
        "flip_rate": (0.0, 0), "ties": (1.0, 3), "fixed_vs_ft": (2.0, 5), "broken_vs_ft": (1.0, 5),
        "kv.kl": (3.0, 2)})
    assert got == {"n": (4.0, None, 4), "acc": (0.75, proportion_stderr(0.75, 4), 4), "tokens": (2.5, None, 4),
                   "ties": (1.0, None, 3), "fixed_vs_ft": (2.0, None, 5), "broken_vs_ft": (1.0, None, 5),
                   "mcnemar_p_vs_ft": (mcnemar_p(2, 1), None, 5), "kv.kl": (1.5, None, 2)}
    assert aggregates.metrics_from_sums({"errors": (2.0, 4)}) == {"errors": (2.0, None, 4)}


def test_deleting_a_job_cascades_to_its_partials(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        by_job, rows = _seed_rows(s, n=20, ranges=[(0, 20)])
        _store_shard(s, by_job, rows, 0, 20)
        job_id = s.scalar(select(Job.id).order_by(Job.id))
        assert {r for r, _, _ in _partials(s)} == set(by_job[0] + by_job[1])
        s.execute(delete(Job).where(Job.id == job_id))
    with session_scope(engine) as s:
        assert {r for r, _, _ in _partials(s)} == set(by_job[1])
    engine.dispose()


def test_migration_backfill_equals_the_write_path(db_url: str) -> None:
    """Rows stored before 0008 (kv of every kind, one kv not an object) get, from the migration, the partials the
    write path stores for them, one per (run, shard range)."""
    upgrade(db_url, "0007")
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        by_job, rows = _seed_rows(s)
        rows[3]["kv"] = {"big": 12345678901234, "tiny": 1e-300, "neg": -0.0, "exp": 2.5e17}
        rows[4]["kv"] = [1.0, 2.0]
        s.execute(insert(SampleResult), [{**r, "created_at": utcnow()} for r in rows])
    engine.dispose()
    upgrade(db_url, "0008")
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        backfilled = _partials(s)
        s.execute(delete(ShardAggregate))
        for start, stop in RANGES:
            for run_ids in by_job:
                aggregates.store_shard_partials(s, run_ids, start, stop)
    with session_scope(engine) as s:
        written = _partials(s)
    assert written and backfilled.keys() == written.keys()
    assert {(r, a) for r, a, _ in written} >= {(r, a) for ids in by_job for r in ids[:1] for a, _ in RANGES}
    assert (by_job[0][0], 0, "kv.big") in written
    for key, (total, n) in written.items():
        assert backfilled[key][1] == n and backfilled[key][0] == pytest.approx(total, rel=1e-12, abs=0), key
    run_ids = [r for ids in by_job for r in ids]
    _assert_equal_to_reference(_refreshed(engine, run_ids), _reference(engine, run_ids))
    engine.dispose()


def test_scalar_kv_stats_keeps_finite_top_level_numbers_only() -> None:
    kv = {"kl": 0.5, "steps": 3, "flag": True, "off": False, "label": "x", "top": [1, 2], "nested": {"a": 1.0},
          "nan": float("nan"), "inf": float("inf"), "none": None}
    assert scalar_kv_stats(kv) == {"kl": 0.5, "steps": 3.0}
    assert all(type(v) is float for v in scalar_kv_stats(kv).values())
    assert scalar_kv_stats(None) == {} and scalar_kv_stats([1.0, 2.0]) == {} and scalar_kv_stats(3.0) == {}
