"""Helpers shared by the service tests: tiny MC datasets and settings pointing at a test database."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from services.settings import Settings
from tests.processes import stop_group

ROOT = Path(__file__).resolve().parents[2]


def tad_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real `tad` CLI of this checkout (`python -m`, from the repository root, so the code under test is
    this tree's even when another checkout is installed in the interpreter's environment)."""
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def write_mc_dataset(path: Path, n: int, poison: set[int] = frozenset(),
                     meta: dict[int, dict[str, Any]] | None = None) -> Path:
    """A small multiple-choice JSONL file; samples in `poison` carry the test-only fault marker, those in `meta`
    that metadata (other test-only hooks, see services/fault_hooks.py)."""
    lines = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"q{i}", "prompt": f"Question {i}: which colour is item {i % 5}? Answer:",
                               "choices": ["red", "green", "blue", "yellow"][: 2 + i % 3], "answer": i % 2}
        if i in poison:
            row["metadata"] = {"tad_test_raise": "poisoned sample"}
        if meta and i in meta:
            row["metadata"] = {**row.get("metadata", {}), **meta[i]}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_settings(db_url: str, roots: list[Path], **kw: Any) -> Settings:
    return Settings(database_url=db_url, model_roots=roots, **kw)


class ApiServer:
    """`tad serve` in its own process group, logging to a file."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "api.log"
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "serve", "--port", str(self.port),
                                      "--log-level", "warning"], env=env, cwd=str(ROOT), stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("tad serve did not answer /health\n" + self.tail())

    def stop(self) -> None:
        stop_group(self.proc, 15)
        self._fh.close()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _free_port() -> int:
    from tests.services.conftest import free_port

    return free_port()
