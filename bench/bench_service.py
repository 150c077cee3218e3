"""Service benchmark (issue 4 item 9), measured side by side in one run.

1. The same N-sample job (default 200, ARC-Easy val, ft + base + tad sweep) through Celery + Postgres (one
   `tad worker`, concurrency 1) and in-process on SQLite (`run_job_embedded`): wall time from submission to
   done, both including one model load; ratio = celery / embedded (target <= 1.1).
2. Time from a shard's start (shards.started_at) to its first rows visible to another connection (polled every
   50 ms from this process), per shard of the Celery run.
3. Leaderboard and run-diff query latency on Postgres holding --rows synthetic sample rows (default 1,000,000).

It uses a private redis-server on a free port and throw-away Postgres databases (dropped at the end).
Usage: python bench/bench_service.py [--model smollm2|tiny] [--samples 200] [--rows 1000000] [--skip-job]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

PG_ADMIN = os.environ.get("TAD_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _create_db() -> str:
    name = f"tad_bench_{secrets.token_hex(4)}"
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def _drop_db(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n "
                       "AND pid <> pg_backend_pid()"), {"n": name})
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    eng.dispose()


def _models(kind: str, work: Path) -> tuple[str, Path]:
    from tests.conftest import build_adapter, build_tiny_model

    from tad_core.models import resolve_base_dir

    if kind == "tiny":
        base_dir = build_tiny_model(work / "tiny")
        return str(base_dir), build_adapter(base_dir, work / "lora")
    base_dir = resolve_base_dir("smollm2-135m-instruct")
    return "smollm2-135m-instruct", build_adapter(base_dir, work / "lora")


def _median_ms(fn, reps: int = 15) -> tuple[float, float]:  # noqa: ANN001
    fn()  # warm (plans, caches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def bench_job(args: argparse.Namespace, work: Path) -> dict:
    from services.db import store
    from services.db.schema import upgrade
    from services.db.session import session_scope
    from services.model_cache import clear_pair_cache
    from services.planning import plan_job
    from services.queueing import enqueue_job
    from services.settings import Settings
    from services.shard_runner import run_job_embedded
    from services.submit_request import SubmitRequest

    base, lora = _models(args.model, work)
    strategies = ["ft", "base", "tad:alpha=0.5,1,2"]
    roots = [work, Path(os.environ.get("TAD_CACHE_DIR", "/tmp/tadcache"))]

    def request() -> SubmitRequest:
        return SubmitRequest(dataset=args.dataset, split="val", limit=args.samples, base=base, adapter=str(lora),
                             strategies=strategies, config={"batch_size": args.batch_size},
                             shard_size=args.shard_size)

    out: dict = {"model": args.model, "samples": args.samples, "dataset": args.dataset, "strategies": strategies,
                 "batch_size": args.batch_size, "shard_size": args.shard_size}
    # warm the OS file cache and the dataset cache once (not timed)
    lite = Settings(database_url=f"sqlite:///{work / 'warm.db'}", model_roots=roots)
    upgrade(lite.database_url)
    warm = plan_job(SubmitRequest(dataset=args.dataset, limit=args.batch_size, base=base, adapter=str(lora),
                                  strategies=strategies, config={"batch_size": args.batch_size}), lite)
    run_job_embedded(warm.job.id, lite)

    # embedded: in-process on SQLite (one model load included)
    clear_pair_cache()
    lite = Settings(database_url=f"sqlite:///{work / 'embedded.db'}", model_roots=roots)
    upgrade(lite.database_url)
    t0 = time.perf_counter()
    plan = plan_job(request(), lite)
    info = run_job_embedded(plan.job.id, lite)
    out["embedded_s"] = time.perf_counter() - t0
    assert info.status == "done", info

    # celery + postgres: a private redis-server, one `tad worker` (concurrency 1), idle before submission
    pg = _create_db()
    redis_dir = work / "redis"
    redis_dir.mkdir()
    port = _free_port()
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir", str(redis_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        upgrade(pg)
        settings = Settings(database_url=pg, broker_url=f"redis://127.0.0.1:{port}/0", queue="tadbench",
                            model_roots=roots)
        env = {**os.environ, "TAD_DATABASE_URL": pg, "TAD_BROKER_URL": settings.broker_url, "TAD_QUEUE": "tadbench",
               "TAD_MODEL_ROOTS": os.pathsep.join(map(str, roots))}
        log = open(work / "worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "services.cli.main", "worker", "--concurrency", "1",
                                   "--name", "bench@%h"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, cwd=str(ROOT))
        deadline = time.time() + 60
        while time.time() < deadline:  # ready once its pool child has announced itself
            with session_scope(settings) as s:
                if store.list_workers(s):
                    break
            time.sleep(0.2)
        time.sleep(1.0)
        t0 = time.perf_counter()
        plan = plan_job(request(), settings)
        enqueue_job(plan.job.id, settings)
        first_seen: dict[int, float] = {}
        eng = create_engine(pg)
        ft_run = plan.runs[0].id
        while True:
            with eng.connect() as c:
                seen = c.execute(text("SELECT DISTINCT sample_index / :k FROM sample_results WHERE run_id = :r"),
                                 {"k": args.shard_size, "r": ft_run}).scalars().all()
                now = time.time()
                for k in seen:
                    first_seen.setdefault(int(k), now)
                status = c.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": plan.job.id}).scalar()
            if status in ("done", "failed", "partial", "cancelled"):
                break
            time.sleep(0.05)
        out["celery_s"] = time.perf_counter() - t0
        assert status == "done", status
        with session_scope(settings) as s:
            shards = store.job_shards(s, plan.job.id)
        lags = [first_seen[sh.start // args.shard_size] - sh.started_at.timestamp() for sh in shards
                if sh.start // args.shard_size in first_seen]
        out["first_rows_s_median"] = statistics.median(lags)
        out["first_rows_s_max"] = max(lags)
        out["first_rows_shards"] = len(lags)
        eng.dispose()
        out["ratio_celery_over_embedded"] = out["celery_s"] / out["embedded_s"]
    finally:
        if worker is not None:
            import signal

            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        redis.terminate()
        redis.wait(10)
        from services.db.session import dispose_engines

        dispose_engines()
        _drop_db(pg)
    return out


def bench_queries(rows: int) -> dict:
    """Fill Postgres with `rows` synthetic sample rows (runs of 10,000 samples) and time the hot queries."""
    import psycopg

    from services.db import store
    from services.db.schema import upgrade
    from services.db.session import make_engine, session_scope

    pg = _create_db()
    out: dict = {"rows": rows}
    try:
        upgrade(pg)
        engine = make_engine(pg)
        per_run, runs_per_job = 10_000, 5
        n_runs = max(2, rows // per_run)
        with session_scope(engine) as s:
            base = store.get_or_create_base_model(s, "synthetic", "/models/synthetic")
            ds, _ = store.register_dataset(s, name="synthetic", split="val", content_hash="0" * 64, task_type="mc",
                                           source="bench", samples=[])
            keys = ["ft", "base", "tad(alpha=0.5,beta=0.0)", "tad(alpha=1.0,beta=0.0)", "tad(alpha=2.0,beta=0.0)"]
            run_ids = []
            for j in range((n_runs + runs_per_job - 1) // runs_per_job):
                k = min(runs_per_job, n_runs - j * runs_per_job)
                job = store.create_job(s, spec={"base": "synthetic", "dataset": "synthetic", "split": "val"},
                                       submitted_by="bench", base_model_id=base.id, adapter_id=None,
                                       dataset_id=ds.id, n_samples=per_run,
                                       runs=[store.RunSpec(key.split("(")[0], {}, key, f"h{j}-{key}")
                                             for key in keys[:k]], shard_ranges=[(0, per_run)])
                run_ids += [r.id for r in store.job_runs(s, job.id)]
        t0 = time.perf_counter()
        rng = random.Random(0)
        conninfo = pg.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
            with cur.copy("COPY sample_results (run_id, sample_index, sample_id, pred, pred_norm, scores, correct, "
                          "correct_norm, vs_ft, latency_s, tokens, kv, created_at) FROM STDIN") as cp:
                for run_id in run_ids:
                    skill = rng.uniform(0.3, 0.7)
                    for i in range(per_run):
                        ok = rng.random() < skill
                        cp.write_row((run_id, i, f"s{i}", 0 if ok else 1, 0, json.dumps([-1.2, -2.3, -3.1, -4.0]),
                                      ok, ok, None, 0.01, 0, json.dumps({"kl_mean": rng.random(), "js_mean": 0.1,
                                                                         "h_f_mean": 2.0, "steps": 3}),
                                      "2026-01-01T00:00:00+00:00"))
            conn.commit()
            cur.execute("ANALYZE")
            conn.commit()
        out["load_s"] = time.perf_counter() - t0
        out["runs"] = len(run_ids)
        t0 = time.perf_counter()
        with session_scope(engine) as s:
            store.refresh_aggregates(s, run_ids)
        out["refresh_all_aggregates_s"] = time.perf_counter() - t0

        def one_refresh() -> None:
            with session_scope(engine) as s:
                store.refresh_aggregates(s, run_ids[-5:])  # one job: 5 runs x 10,000 rows

        def board_all() -> None:
            with session_scope(engine) as s:
                assert len(store.leaderboard(s, limit=500)) == min(500, len(run_ids))

        def board_dataset() -> None:
            with session_scope(engine) as s:
                store.leaderboard(s, dataset_id=ds.id, limit=100)

        def diff() -> None:
            with session_scope(engine) as s:
                d = store.run_diff(s, run_ids[-1], run_ids[-2], limit=200)
                assert d.both_right + d.a_only + d.b_only + d.both_wrong == per_run

        out["leaderboard_ms"] = _median_ms(board_all)
        out["leaderboard_dataset_ms"] = _median_ms(board_dataset)
        out["run_diff_ms"] = _median_ms(diff)
        out["refresh_one_job_aggregates_ms"] = _median_ms(one_refresh, reps=5)
        engine.dispose()
    finally:
        _drop_db(pg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--dataset", default="arc_easy")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shard-size", type=int, default=24)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--skip-queries", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TAD_CACHE_DIR", "/tmp/tadcache")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="tad_bench_") as tmp:
        if not args.skip_job:
            results["job"] = bench_job(args, Path(tmp))
            print(json.dumps(results["job"], indent=2), flush=True)
        if not args.skip_queries:
            results["queries"] = bench_queries(args.rows)
            print(json.dumps(results["queries"], indent=2), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
