"""Reliability benchmark (issue 13): inject each fault into a real deployment and count what survives.

For every fault a fresh Postgres database, a private redis-server (on a free port, AOF on; the shared Redis on
6379 is never touched) and real `tad worker` processes run one job of --samples samples x 2 strategies (ft,
tad:alpha=1) in shards of --shard-size. The fault is injected mid-job; the script then only waits. It prints, per
fault: rows expected / present / duplicated, rows that record a sample error, the job's status, the time from
submission to the end of the job, and the manual steps needed (a `tad requeue` the script had to run because
the job was still open after --patience seconds: the target is 0).

Faults: none (baseline), a pool child SIGKILLed, a whole worker SIGKILLed (main process and children; a second
worker is running), Redis restarted with its data (AOF) and without it, every Postgres backend of the job's
database terminated three times (pg_terminate_backend), a poisoned sample (its evaluation raises; test hook
TAD_ENABLE_TEST_FAULTS=1), a line with 10,000 choices and a prompt of 16,700 4-byte characters (~50k tokens,
under the character limit). The last two are refused at submission by default; the script also submits them as
a deployment with looser limits would have, to show the worker enforcing its own budgets.

The workers run with the default visibility timeout (1 h), so no recovery below comes from it, and with
TAD_TEST_BATCH_DELAY=0.3 (test hook) so that each job lasts long enough to be hit mid-way.

Usage: python bench/bench_faults.py [--model tiny|smollm2] [--samples 40] [--only NAME ...] [--markdown]
Needs: Postgres (TAD_BENCH_PG_ADMIN_URL, default postgresql+psycopg://postgres@127.0.0.1:5432/test), redis-server.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

PG_ADMIN = os.environ.get("TAD_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
STRATEGIES = ["ft", "tad:alpha=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _create_db() -> str:
    name = f"tad_faults_{secrets.token_hex(4)}"
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def _terminate_backends(url: str) -> int:
    """pg_terminate_backend on every connection to the database of `url`; returns how many."""
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        n = c.execute(text("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = :n AND pid <> pg_backend_pid()) t"), {"n": url.rsplit("/", 1)[1]}).scalar()
    eng.dispose()
    return int(n or 0)


def _drop_db(url: str) -> None:
    _terminate_backends(url)
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}"'))
    eng.dispose()


class Redis:
    """A private redis-server with AOF persistence in `workdir`, restartable with or without its data."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir, self.proc = _free_port(), workdir, None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed")
        self.proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, wipe: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        if wipe:
            for f in self.workdir.rglob("*"):
                if f.is_file():
                    f.unlink()


class Worker:
    """A real `tad worker` (prefork, concurrency 1) in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], name: str, log_dir: Path) -> None:
        self.name, self.log = name, log_dir / f"{name}.log"
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "worker", "--concurrency", "1",
                                      "--name", f"{name}@%h", "--loglevel", "INFO"], env=env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT))

    def children(self) -> set[int]:
        out = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                        out.add(int(entry.name))
                except (OSError, ValueError, IndexError):
                    continue
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._fh.close()


@dataclass
class Env:
    """One fault's deployment: database, broker, workers, and the Settings the script uses."""

    db_url: str
    redis: Redis
    env: dict[str, str]
    settings: Any
    work: Path
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, name: str) -> Worker:
        w = Worker(self.env, name, self.work)
        self.workers.append(w)
        return w


@dataclass
class Outcome:
    fault: str
    expected: int
    present: int
    duplicated: int
    error_rows: int
    status: str
    seconds: float
    manual_steps: int
    note: str = ""


def _shards(settings: Any, job_id: int) -> list[Any]:
    from services.db import store
    from services.db.session import session_scope

    with session_scope(settings) as s:
        return store.job_shards(s, job_id)


def _job(settings: Any, job_id: int) -> Any:
    from services.db import store
    from services.db.session import session_scope

    with session_scope(settings) as s:
        return store.get_job(s, job_id)


def _wait(cond: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    return None


def _mid_shard(e: Env, job_id: int, worker: Worker | None = None) -> Any:
    """Wait until a shard (of `worker`, if given) is running with some rows stored; returns it."""
    def find() -> Any:
        pids = {str(p) for p in worker.children()} if worker else None
        return next((x for x in _shards(e.settings, job_id) if x.status == "running" and x.samples_done >= 2
                     and (pids is None or (x.worker or "").rpartition(":")[2] in pids)), None)
    return _wait(find, 180)


def _rows(db_url: str) -> tuple[int, int, int]:
    eng = create_engine(db_url)
    with eng.connect() as c:
        total = c.execute(text("SELECT count(*) FROM sample_results")).scalar()
        distinct = c.execute(text("SELECT count(*) FROM (SELECT DISTINCT run_id, sample_index FROM sample_results) d")
                             ).scalar()
        errors = c.execute(text("SELECT count(*) FROM sample_results WHERE error IS NOT NULL")).scalar()
    eng.dispose()
    return int(distinct), int(total) - int(distinct), int(errors)


def _dataset(path: Path, n: int, special: dict[int, dict[str, Any]] | None = None) -> Path:
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"q{i}", "prompt": f"Question {i}: which colour is item {i % 5}? Answer:",
                               "choices": ["red", "green", "blue", "yellow"][: 2 + i % 3], "answer": i % 2}
        row.update((special or {}).get(i, {}))
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def _submit(e: Env, data: Path, base: str, lora: Path, shard_size: int, loose: bool = False) -> int:
    from services.planning import plan_job
    from services.queueing import enqueue_job
    from services.submit_request import SubmitRequest

    settings = e.settings.model_copy(update={"max_choices": 20_000, "max_prompt_tokens": 1_000_000}) if loose \
        else e.settings
    req = SubmitRequest(dataset=str(data), base=base, adapter=str(lora), strategies=STRATEGIES,
                        config={"batch_size": 2}, shard_size=shard_size)
    job_id = plan_job(req, settings).job.id
    enqueue_job(job_id, e.settings)
    return job_id


def _finish(e: Env, job_id: int, started: float, patience: float) -> tuple[Any, int]:
    """Wait for the job to end; when it is still open after `patience` s, run `tad requeue` (a manual step)."""
    from services.queueing import requeue_job

    manual = 0
    while True:
        job = _wait(lambda: (j := _job(e.settings, job_id)).finished and j, patience)
        if job is not None or manual >= 2:
            return job or _job(e.settings, job_id), manual
        manual += 1
        requeue_job(job_id, e.settings)


def run_fault(name: str, args: argparse.Namespace, base: str, lora: Path, work: Path, root: Path) -> Outcome:
    from services.db.schema import upgrade
    from services.settings import Settings

    db_url = _create_db()
    redis = Redis(work / "redis")
    redis.start()
    queue = f"faults-{secrets.token_hex(3)}"
    roots = [root]  # the models, the adapter and the datasets all live under the script's temporary directory
    env = {**os.environ, "TAD_DATABASE_URL": db_url, "TAD_BROKER_URL": redis.url, "TAD_QUEUE": queue,
           "TAD_MODEL_ROOTS": os.pathsep.join(map(str, roots)), "TAD_HEARTBEAT_INTERVAL": str(args.heartbeat),
           "TAD_ENABLE_TEST_FAULTS": "1", "TAD_TEST_BATCH_DELAY": "0.3", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    settings = Settings(database_url=db_url, broker_url=redis.url, queue=queue, model_roots=roots,
                        heartbeat_interval=args.heartbeat)
    e = Env(db_url, redis, env, settings, work)
    n, note = args.samples, ""
    special: dict[int, dict[str, Any]] = {}
    try:
        upgrade(db_url)
        if name == "poisoned sample":
            special = {n // 2: {"metadata": {"tad_test_raise": "poisoned sample"}}}
        elif name == "10k-choice line":
            special = {n // 2: {"choices": [f"choice {k}" for k in range(10_000)]}}
        elif name == "huge prompt":
            special = {n // 2: {"prompt": "\U0001d518" * 16_700}}
        data = _dataset(work / f"{name.replace(' ', '_')}.jsonl", n, special)
        if name in ("10k-choice line", "huge prompt"):
            from services.planning import plan_job
            from services.submit_request import SubmissionError, SubmitRequest

            try:
                plan_job(SubmitRequest(dataset=str(data), base=base, adapter=str(lora), strategies=STRATEGIES),
                         settings)
                note = "accepted at submission (!)"
            except SubmissionError as err:
                note = f"refused at submission ({err.errors[0].split(': ', 2)[-1]}), nothing stored"
        a = e.start_worker("a")
        b = e.start_worker("b") if name == "worker SIGKILL" else None
        started = time.monotonic()
        job_id = _submit(e, data, base, lora, args.shard_size, loose=name in ("10k-choice line", "huge prompt"))
        if name == "child SIGKILL":
            shard = _mid_shard(e, job_id, a)
            os.kill(int(shard.worker.rpartition(":")[2]), signal.SIGKILL)
            note = f"killed pool child {shard.worker} in shard [{shard.start},{shard.stop})"
        elif name == "worker SIGKILL":
            victim = next(w for w in _wait(lambda: [w for w in (a, b) if _mid_shard_now(e, job_id, w)], 180))
            victim.kill()
            note = f"killed worker {victim.name} (main + children) mid-shard; worker {'b' if victim is a else 'a'} ran on"
        elif name.startswith("Redis restart"):
            _wait(lambda: sum(x.status == "done" for x in _shards(settings, job_id)) >= 1, 180)
            redis.stop(wipe="without" in name)
            time.sleep(2)
            redis.start()
            note = "restarted after the first shard" + (", AOF files deleted" if "without" in name else "")
        elif name == "Postgres backends terminated":
            _wait(lambda: sum(x.status == "done" for x in _shards(settings, job_id)) >= 1, 180)
            killed = 0
            for _ in range(3):
                killed += _terminate_backends(db_url)
                time.sleep(1.0)
            note = f"{killed} backends terminated in 3 rounds"
        job, manual = _finish(e, job_id, started, args.patience)
        seconds = time.monotonic() - started
        present, dup, errors = _rows(db_url)
        if errors and name != "none":
            note += ("; then " if note else "") + f"the worker recorded {errors // len(STRATEGIES)} sample(s) as error rows, the rest ran"
        return Outcome(name, n * len(STRATEGIES), present, dup, errors, job.status, seconds, manual, note)
    finally:
        for w in e.workers:
            w.stop()
        redis.stop(wipe=True)
        from services.db.session import dispose_engines

        dispose_engines()
        _drop_db(db_url)


def _mid_shard_now(e: Env, job_id: int, worker: Worker) -> bool:
    pids = {str(p) for p in worker.children()}
    return any(x.status == "running" and x.samples_done >= 2 and (x.worker or "").rpartition(":")[2] in pids
               for x in _shards(e.settings, job_id))


FAULTS = ["none", "child SIGKILL", "worker SIGKILL", "Redis restart with data", "Redis restart without data",
          "Postgres backends terminated", "poisoned sample", "10k-choice line", "huge prompt"]


def _models(kind: str, work: Path) -> tuple[str, Path]:
    from tests.conftest import build_adapter, build_tiny_model

    from tad_core.models import resolve_base_dir

    if kind == "tiny":
        base_dir = build_tiny_model(work / "models" / "tiny")
        return str(base_dir), build_adapter(base_dir, work / "lora")
    base_dir = resolve_base_dir("smollm2-135m-instruct")
    return "smollm2-135m-instruct", build_adapter(base_dir, work / "lora")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--heartbeat", type=float, default=2.0, help="TAD_HEARTBEAT_INTERVAL of the workers")
    ap.add_argument("--patience", type=float, default=240.0, help="seconds before the script runs `tad requeue`")
    ap.add_argument("--only", nargs="*", choices=FAULTS, help="run only these faults")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()
    os.environ.setdefault("TAD_CACHE_DIR", "/tmp/tadcache")
    out: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="tad_faults_") as tmp:
        work = Path(tmp)
        base, lora = _models(args.model, work)
        for name in args.only or FAULTS:
            fault_dir = work / name.replace(" ", "_")
            fault_dir.mkdir()
            res = run_fault(name, args, base, lora, fault_dir, work)
            out.append(res)
            print(json.dumps(res.__dict__), flush=True)
    head = "| fault | rows expected | present | duplicated | error rows | job | time to finish (s) | manual steps | notes |"
    print("\n" + head + "\n|" + "---|" * 9 if args.markdown else "")
    for r in out:
        cells = [r.fault, r.expected, r.present, r.duplicated, r.error_rows, r.status, f"{r.seconds:.0f}",
                 r.manual_steps, r.note]
        print("| " + " | ".join(str(c) for c in cells) + " |" if args.markdown else "\t".join(map(str, cells)))


if __name__ == "__main__":
    main()
