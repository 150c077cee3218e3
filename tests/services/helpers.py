"""Helpers shared by the service tests: tiny MC datasets and settings pointing at a test database."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.settings import Settings


def write_mc_dataset(path: Path, n: int, poison: set[int] = frozenset(),
                     meta: dict[int, dict[str, Any]] | None = None) -> Path:
    """A small multiple-choice JSONL file; samples in `poison` carry the test-only fault marker, those in `meta`
    that metadata (other test-only hooks, see services/jobs.py)."""
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
