"""Run aggregates computed by the database give the numbers of the Python implementation, on both dialects."""
from __future__ import annotations

import math
import random

import pytest
from sqlalchemy import delete, select

from services.db import aggregates, store
from services.db.models import RunAggregate, SampleResult
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


def _seed(s, n: int = 60):
    base = store.get_or_create_base_model(s, "tiny", "/tmp/tiny")
    ds, _ = store.register_dataset(s, name="toy", split="val", content_hash="h", task_type="mc", source="test",
                                   samples=[{"id": f"s{i}", "prompt": "q", "choices": ["a", "b"], "answer": 0}
                                            for i in range(n)])
    jobs = []
    for j in range(2):
        job = store.create_job(s, spec={"base": "tiny"}, submitted_by="me", base_model_id=base.id, adapter_id=None,
                               dataset_id=ds.id, n_samples=n,
                               runs=[store.RunSpec(k.split("(")[0], {}, k, f"h{j}{k}") for k in KEYS],
                               shard_ranges=[(0, n)])
        jobs.append(job)
    rng = random.Random(7)
    rows = []
    run_ids = []
    for job in jobs:
        for r in store.job_runs(s, job.id):
            run_ids.append(r.id)
            skill = rng.uniform(0.2, 0.8)
            for i in range(n if r.key != "base" else n // 2):  # base scored half the samples
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
    store.upsert_sample_results(s, rows)
    return run_ids


def _table(s):
    return {(r, m): (v, se, n) for r, m, v, se, n in s.execute(
        select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n))}


def _same(a, b) -> bool:
    return a[2] == b[2] and all((x is None and y is None) or (x is not None and y is not None
                                                             and x == pytest.approx(y, rel=1e-12, abs=1e-12))
                                for x, y in zip(a[:2], b[:2]))


def test_sql_aggregates_equal_the_python_ones(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        run_ids = _seed(s)
    with session_scope(engine) as s:
        store.refresh_aggregates(s, run_ids)  # the implementation that averaged kv JSON in Python
        old = _table(s)
        reference_kv = _python_kv_means(s, run_ids)
        s.execute(delete(RunAggregate))
    with session_scope(engine) as s:
        aggregates.refresh_aggregates(s, run_ids)
        new = _table(s)
    assert set(new) == set(old)
    for key in old:
        assert _same(new[key], old[key]), (key, new[key], old[key])
    for key, want in reference_kv.items():
        assert _same(new[key], want), (key, new[key], want)
    ft, base = run_ids[0], run_ids[1]
    metrics = {m for r, m in new if r == base}
    # what the seed makes visible: scalar kv keys only (no bool, string, list or object), paired counts vs ft
    assert {"kv.kl_mean", "kv.js_mean", "kv.steps", "kv.h_f_max"} <= metrics
    assert not metrics & {"kv.flag", "kv.label", "kv.promoted", "kv.nested", "kv.per_step"}
    assert new[(base, "kv.h_f_max")][2] < new[(base, "kv.kl_mean")][2]  # n counts the rows that have the key
    assert new[(base, "fixed_vs_ft")][2] == sum(1 for i in range(30) if i % 17 and i % 13)  # scored by both
    assert (ft, "fixed_vs_ft") not in new and (ft, "acc") in new
    engine.dispose()


def test_refresh_overwrites_and_ignores_other_runs(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with session_scope(engine) as s:
        run_ids = _seed(s, n=20)
        aggregates.refresh_aggregates(s, run_ids[:2])
        before = _table(s)
        assert {r for r, _ in before} == set(run_ids[:2])
        s.execute(delete(SampleResult).where(SampleResult.run_id == run_ids[0], SampleResult.sample_index >= 10))
        aggregates.refresh_aggregates(s, run_ids[:1])
        aggregates.refresh_aggregates(s, [])
        after = _table(s)
    assert after[(run_ids[0], "n")][0] == 10.0 and before[(run_ids[0], "n")][0] == 20.0
    assert after[(run_ids[1], "n")] == before[(run_ids[1], "n")]
    engine.dispose()
