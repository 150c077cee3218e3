"""Fixtures for the service tests: throw-away Postgres databases, SQLite files, a private Redis server.

Every test gets its own database (`tad_test_<random>` on the machine's Postgres, dropped afterwards) so tests
of several engineers can run side by side; Redis runs as a private `redis-server` on a free port for the same
reason (and so the fault tests can restart it without disturbing anyone).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.processes import stop_group

PG_ADMIN_URL = os.environ.get("TAD_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    try:
        eng = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001
        return False


def create_pg_database() -> str:
    """Create an empty Postgres database and return its URL."""
    name = f"tad_test_{secrets.token_hex(6)}"
    eng = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    eng = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n AND pid <> pg_backend_pid()"),
                  {"n": name})
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    eng.dispose()


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ.setdefault("TAD_CACHE_DIR", "/tmp/tadcache")


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not _pg_available():
        pytest.skip("no Postgres at " + PG_ADMIN_URL)
    url = create_pg_database()
    try:
        yield url
    finally:
        from services.db.session import dispose_engines

        dispose_engines()
        drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tad.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each dialect."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tad.db'}"
        return
    yield request.getfixturevalue("pg_url")


@pytest.fixture
def migrated_url(db_url: str) -> str:
    """A database of each dialect at the Alembic head."""
    from services.db.schema import upgrade

    upgrade(db_url)
    return db_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server on a free port (restartable, for the fault tests)."""

    def __init__(self, workdir: Path, appendonly: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server not installed")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, persistent (AOF) Redis, as a Celery broker should be deployed (a restart keeps the queue)."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class WorkerProcess:
    """A real `tad worker` (Celery prefork) subprocess in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], name: str, log_dir: Path, concurrency: int = 1) -> None:
        import sys

        self.name = name
        self.log = log_dir / f"{name}.log"
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "worker", "--concurrency", str(concurrency), "--name",
             f"{name}@%h", "--loglevel", "INFO"],
            env=env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]))

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and its pool children), like a machine dying."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_group(self.proc, 20)
        self._fh.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture
def service(pg_url: str, redis_server: RedisServer, tiny_model_dir: Path, tiny_lora_dir: Path,
            tmp_path: Path) -> Iterator[dict]:
    """Postgres at head + private Redis + an environment for `tad worker` subprocesses and test-side Settings."""
    from services.db.schema import upgrade
    from services.settings import Settings

    upgrade(pg_url)
    roots = [tiny_model_dir.parent.parent, tmp_path]
    env = {
        **os.environ,
        "TAD_DATABASE_URL": pg_url,
        "TAD_BROKER_URL": redis_server.url,
        "TAD_QUEUE": f"tadtest-{secrets.token_hex(4)}",
        "TAD_MODEL_ROOTS": os.pathsep.join(str(r) for r in roots),
        "TAD_VISIBILITY_TIMEOUT": "8",
        "TAD_RESTORE_INTERVAL": "1",
        "TAD_MAX_REDELIVERIES": "3",
        "TAD_ENABLE_TEST_FAULTS": "1",
        "TAD_TEST_BATCH_DELAY": "0.3",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    settings = Settings(database_url=pg_url, broker_url=redis_server.url, queue=env["TAD_QUEUE"], model_roots=roots,
                        visibility_timeout=8, restore_interval=1, max_redeliveries=3)
    workers: list[WorkerProcess] = []

    def start_worker(name: str, **extra_env: str) -> WorkerProcess:
        w = WorkerProcess({**env, **extra_env}, name, tmp_path)
        workers.append(w)
        return w

    try:
        yield {"env": env, "settings": settings, "start_worker": start_worker, "redis": redis_server,
               "model": tiny_model_dir, "lora": tiny_lora_dir, "tmp": tmp_path, "workers": workers}
    finally:
        for w in workers:
            w.stop()
