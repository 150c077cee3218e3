"""Per-sample result export shared by `tad results --csv` and the HTTP API's streamed samples endpoint.

One definition of the CSV columns and of how a stored row becomes CSV cells or a JSON-safe record, and a reader
that pages through a job's rows (one short session per page) so a million-row job streams in bounded memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from services.db import store
from services.db.session import session_scope
from services.settings import Settings

SAMPLE_CSV_COLUMNS = ["strategy", "run_id", "sample_index", "sample_id", "pred", "pred_norm", "correct",
                      "correct_norm", "vs_ft", "tie", "extracted", "output", "tokens", "latency_s", "scores", "kv",
                      "error"]
DEFAULT_PAGE = 500


def sample_csv_cells(key: str, row: dict[str, Any]) -> list[Any]:
    """One CSV line of a stored sample row (`key`: the run's strategy key); JSON for the list/dict columns."""
    return [key] + [json.dumps(row[c]) if c in ("scores", "kv") else row[c] for c in SAMPLE_CSV_COLUMNS[1:]]


def plain(value: Any) -> Any:
    """`value` as strict JSON can carry it: dataclasses to dicts, datetimes to ISO text, paths to text and
    non-finite floats to None (a NaN statistic must not break a JSON response)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def job_run_keys(settings: Settings, job_id: int) -> list[tuple[str, int]]:
    """(strategy key, run id) of each run of a job, in leaderboard order; NotFound for an unknown job."""
    with session_scope(settings) as s:
        store.get_job(s, job_id)
        return [(r.key, r.run_id) for r in store.leaderboard(s, job_ids=[job_id])]


def iter_sample_rows(settings: Settings, runs: list[tuple[str, int]],
                     page_size: int = DEFAULT_PAGE) -> Iterator[tuple[str, dict[str, Any]]]:
    """(strategy key, row) for every stored sample row of `runs`, read `page_size` rows per session."""
    for key, run_id in runs:
        start = 0
        while True:
            with session_scope(settings) as s:
                rows = store.sample_rows(s, run_id, start, limit=page_size)
            for row in rows:
                yield key, row
            if len(rows) < page_size:
                break
            start = rows[-1]["sample_index"] + 1
