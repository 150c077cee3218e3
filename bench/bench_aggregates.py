"""Run aggregates: the Python reference (`store.refresh_aggregates`, every row read) vs the refresh from per-shard
partial sums (`aggregates.refresh_aggregates`), side by side, and the write-side cost the partials add per shard.

    python bench/bench_aggregates.py                          # Postgres, 1,000,000 rows (100 runs x 10,000), as bench_service
    python bench/bench_aggregates.py --dialect sqlite --rows 200000
    python bench/bench_aggregates.py --kv mc                  # kv as MC scoring stores it (12 stats + top-k lists)

Synthetic `sample_results` rows in jobs of 5 runs x 10,000 samples, shards of 1,000 samples, loaded by COPY; the
partials of every shard are then built from the rows (`aggregates.rebuild_partials`, timed on its own). Prints, for
one job's refresh (what runs after every shard) and for all runs at once: the old and the new time and their
ratio, timed round-robin (median of `--repeats`), checks both wrote the same aggregates, and times what a worker
now pays when a shard ends: `store_shard_partials` for one 1,000-sample shard of a 5-run job, beside upserting
that shard's 5,000 rows with `upsert_sample_results` (one executemany; a worker commits per batch, so its real
write cost is higher).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402

PER_RUN, RUNS_PER_JOB, SHARD = 10_000, 5, 1_000
KEYS = ["ft", "base", "tad(alpha=0.5,beta=0.0)", "tad(alpha=1.0,beta=0.0)", "tad(alpha=2.0,beta=0.0)"]


def _kv(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind == "service":  # the kv of bench_service.py's 1M-row benchmark (the recorded 1.07 s)
        return {"kl_mean": rng.random(), "js_mean": 0.1, "h_f_mean": 2.0, "steps": 3}
    stats = {f"{s}_{agg}": rng.random() for s in ("kl", "js", "kv_l1", "kv_max", "h_f", "h_b") for agg in ("mean", "max")}
    top = [[f"tok{i}", rng.randint(0, 49151), round(rng.random(), 6)] for i in range(5)]
    return {**stats, "steps": 3, "promoted": top, "demoted": top}


def _seed(url: str, rows: int, kind: str) -> list[int]:
    from services.db import store
    from services.db.session import make_engine, session_scope

    engine = make_engine(url)
    n_runs = max(2, rows // PER_RUN)
    with session_scope(engine) as s:
        base = store.get_or_create_base_model(s, "synthetic", "/models/synthetic")
        ds, _ = store.register_dataset(s, name="synthetic", split="val", content_hash="0" * 64, task_type="mc",
                                       source="bench", samples=[])
        run_ids: list[int] = []
        for j in range((n_runs + RUNS_PER_JOB - 1) // RUNS_PER_JOB):
            k = min(RUNS_PER_JOB, n_runs - j * RUNS_PER_JOB)
            job = store.create_job(s, spec={"base": "synthetic"}, submitted_by="bench", base_model_id=base.id,
                                   adapter_id=None, dataset_id=ds.id, n_samples=PER_RUN,
                                   runs=[store.RunSpec(key.split("(")[0], {}, key, f"h{j}-{key}") for key in KEYS[:k]],
                                   shard_ranges=[(a, a + SHARD) for a in range(0, PER_RUN, SHARD)])
            run_ids += [r.id for r in store.job_runs(s, job.id)]
    engine.dispose()
    rng = random.Random(0)

    def rows_of(run_id: int):  # noqa: ANN202
        skill = rng.uniform(0.3, 0.7)
        for i in range(PER_RUN):
            ok = rng.random() < skill
            yield (run_id, i, f"s{i}", 0 if ok else 1, 0, json.dumps([-1.2, -2.3, -3.1, -4.0]), ok, ok,
                   0.01, 0, json.dumps(_kv(rng, kind)), "2026-01-01T00:00:00+00:00")

    cols = ("run_id, sample_index, sample_id, pred, pred_norm, scores, correct, correct_norm, latency_s, tokens, kv, "
            "created_at")
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            for run_id in run_ids:
                conn.executemany(f"INSERT INTO sample_results ({cols}) VALUES ({','.join('?' * 12)})",
                                 rows_of(run_id))
            conn.execute("ANALYZE")
    else:
        import psycopg

        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn, conn.cursor() as cur:
            with cur.copy(f"COPY sample_results ({cols}) FROM STDIN") as cp:
                for run_id in run_ids:
                    for row in rows_of(run_id):
                        cp.write_row(row)
            conn.commit()
            cur.execute("ANALYZE")
            conn.commit()
    return run_ids


def _snapshot(url: str) -> dict[tuple[int, str], tuple[Any, ...]]:
    from sqlalchemy import select

    from services.db.models import RunAggregate
    from services.db.session import make_engine, session_scope

    engine = make_engine(url)
    with session_scope(engine) as s:
        out = {(r, m): (v, se, n) for r, m, v, se, n in s.execute(
            select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n))}
    engine.dispose()
    return out


def _same(a: dict, b: dict) -> bool:
    def close(x: Any, y: Any) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and abs(x - y) <= 1e-9 * max(1, abs(x)))
    return a.keys() == b.keys() and all(a[k][2] == b[k][2] and close(a[k][0], b[k][0]) and close(a[k][1], b[k][1])
                                        for k in a)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _write_side(engine: Any, job: list[int], repeats: int) -> dict[str, float]:
    """Median seconds of `store_shard_partials` for one shard of `job` and of upserting that shard's rows (deleted
    first, so they are inserted as a worker inserts them), each in its own transaction with its commit,
    round-robin."""
    from sqlalchemy import delete

    from services.db import aggregates, store
    from services.db.models import SampleResult
    from services.db.session import session_scope

    start = PER_RUN // 2
    with session_scope(engine) as s:
        rows = [r for run_id in job for r in store.sample_rows(s, run_id, start, SHARD)]

    def upsert() -> None:
        with session_scope(engine) as s:
            store.upsert_sample_results(s, rows)

    def partials() -> None:
        with session_scope(engine) as s:
            aggregates.store_shard_partials(s, job, start, start + SHARD)

    times: dict[str, list[float]] = {"upsert": [], "partials": []}
    for _ in range(repeats):
        with session_scope(engine) as s:
            s.execute(delete(SampleResult).where(SampleResult.run_id.in_(job), SampleResult.sample_index >= start,
                                                 SampleResult.sample_index < start + SHARD))
        times["upsert"].append(_timed(upsert))
        times["partials"].append(_timed(partials))
    return {k: statistics.median(v) for k, v in times.items()} | {"rows": float(len(rows))}


def bench(url: str, rows: int, kind: str, repeats: int) -> list[str]:
    from sqlalchemy import func, select

    from services.db import aggregates, store
    from services.db.models import ShardAggregate
    from services.db.schema import upgrade
    from services.db.session import make_engine, session_scope

    upgrade(url)
    t0 = time.perf_counter()
    run_ids = _seed(url, rows, kind)
    load_s = time.perf_counter() - t0
    engine = make_engine(url)

    def refresh(fn: Callable[..., None], ids: list[int]) -> Callable[[], None]:
        def go() -> None:
            with session_scope(engine) as s:
                fn(s, ids)
        return go

    rebuild_s = _timed(refresh(aggregates.rebuild_partials, run_ids))
    with session_scope(engine) as s:
        n_partials = s.scalar(select(func.count()).select_from(ShardAggregate))
    impls = {"python": store.refresh_aggregates, "partials": aggregates.refresh_aggregates}
    snaps = {}
    whole: dict[str, float] = {}
    for name, fn in impls.items():  # every run at once, once each (the old one takes many seconds)
        whole[name] = _timed(refresh(fn, run_ids))
        snaps[name] = _snapshot(url)
    same = _same(snaps["python"], snaps["partials"])
    job = run_ids[-RUNS_PER_JOB:]
    times: dict[str, list[float]] = {k: [] for k in impls}
    for name, fn in impls.items():  # warm-up
        refresh(fn, job)()
    for _ in range(repeats):
        for name, fn in impls.items():
            times[name].append(_timed(refresh(fn, job)))
    write = _write_side(engine, job, repeats)
    engine.dispose()
    one = {k: statistics.median(v) for k, v in times.items()}
    dialect = "SQLite" if url.startswith("sqlite") else "Postgres"
    return [
        f"{dialect}, {len(run_ids) * PER_RUN:,} rows ({len(run_ids)} runs x {PER_RUN:,}, shards of {SHARD:,}), "
        f"kv={kind}, loaded in {load_s:.1f} s; partials built from the rows in {rebuild_s:.1f} s "
        f"({n_partials:,} partial rows); both implementations wrote the same aggregates: {same}",
        "| refresh | python reference, every row (before) | sum of shard partials (now) | before / now |",
        "|---|---|---|---|",
        f"| one job (5 runs x 10,000 rows), median of {repeats} | {one['python'] * 1000:,.0f} ms | "
        f"{one['partials'] * 1000:,.1f} ms | **{one['python'] / one['partials']:.1f}x** |",
        f"| all {len(run_ids)} runs, once | {whole['python']:.2f} s | {whole['partials']:.3f} s | "
        f"**{whole['python'] / whole['partials']:.1f}x** |",
        f"write side, per shard end, median of {repeats}: store_shard_partials for one {SHARD:,}-sample shard of a "
        f"5-run job {write['partials'] * 1000:,.1f} ms; upsert_sample_results of its {write['rows']:,.0f} rows "
        f"{write['upsert'] * 1000:,.0f} ms (partials = {write['partials'] / write['upsert']:.1%} of the upsert)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialect", choices=["postgres", "sqlite"], default="postgres")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--kv", choices=["service", "mc"], default="service")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if args.dialect == "sqlite":
        with tempfile.TemporaryDirectory(prefix="tad_bench_") as tmp:
            lines = bench(f"sqlite:///{tmp}/tad.db", args.rows, args.kv, args.repeats)
    else:
        from bench.bench_service import _create_db, _drop_db
        from services.db.session import dispose_engines

        url = _create_db()
        try:
            lines = bench(url, args.rows, args.kv, args.repeats)
        finally:
            dispose_engines()
            _drop_db(url)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
