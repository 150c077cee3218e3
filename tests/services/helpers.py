"""Helpers shared by the service tests: tiny MC datasets and settings pointing at a test database."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from services.settings import Settings

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
