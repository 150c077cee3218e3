"""Run aggregates: the Python kv averaging (`store.refresh_aggregates`) vs the database's (`aggregates`), side by side.

    python bench/bench_aggregates.py                          # Postgres, 1,000,000 rows (100 runs x 10,000), as bench_service
    python bench/bench_aggregates.py --dialect sqlite --rows 200000
    python bench/bench_aggregates.py --kv mc                  # kv as MC scoring stores it (12 stats + top-k lists)

Synthetic `sample_results` rows in jobs of 5 runs x 10,000 samples. Prints, for one job's refresh (what runs
after every shard) and for all runs at once: the old and the new time and their ratio, timed round-robin (median
of `--repeats`), and checks both wrote the same aggregates.
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

PER_RUN, RUNS_PER_JOB = 10_000, 5
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
                                   shard_ranges=[(0, PER_RUN)])
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


def bench(url: str, rows: int, kind: str, repeats: int) -> list[str]:
    from services.db import aggregates, store
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

    impls = {"python": store.refresh_aggregates, "sql": aggregates.refresh_aggregates}
    snaps = {}
    whole: dict[str, float] = {}
    for name, fn in impls.items():  # every run at once, once each (the old one takes many seconds)
        t0 = time.perf_counter()
        refresh(fn, run_ids)()
        whole[name] = time.perf_counter() - t0
        snaps[name] = _snapshot(url)
    same = _same(snaps["python"], snaps["sql"])
    job = run_ids[-RUNS_PER_JOB:]
    times: dict[str, list[float]] = {k: [] for k in impls}
    for name, fn in impls.items():  # warm-up
        refresh(fn, job)()
    for _ in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            refresh(fn, job)()
            times[name].append(time.perf_counter() - t0)
    engine.dispose()
    one = {k: statistics.median(v) for k, v in times.items()}
    dialect = "SQLite" if url.startswith("sqlite") else "Postgres"
    return [
        f"{dialect}, {len(run_ids) * PER_RUN:,} rows ({len(run_ids)} runs x {PER_RUN:,}), kv={kind}, loaded in "
        f"{load_s:.1f} s; both implementations wrote the same aggregates: {same}",
        "| refresh | python kv averaging (before) | in the database (now) | before / now |",
        "|---|---|---|---|",
        f"| one job (5 runs x 10,000 rows), median of {repeats} | {one['python'] * 1000:,.0f} ms | "
        f"{one['sql'] * 1000:,.0f} ms | **{one['python'] / one['sql']:.1f}x** |",
        f"| all {len(run_ids)} runs, once | {whole['python']:.2f} s | {whole['sql']:.2f} s | "
        f"**{whole['python'] / whole['sql']:.1f}x** |",
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
