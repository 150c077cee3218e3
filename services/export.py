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
                      "error", "gold"]
DEFAULT_PAGE = 500
NEG_INF = "-inf"  # how exports spell a choice's -inf log-likelihood (the DB stores null; strict JSON has no -inf)


def gold_of(sample: dict[str, Any]) -> Any:
    """The gold answer of a stored sample: the choice index (MC) or the reference text (generation)."""
    return sample["reference"] if sample.get("reference") is not None else sample.get("answer")


def export_row(row: dict[str, Any], gold: Any = None) -> dict[str, Any]:
    """A stored sample row as exports show it: the sample's `gold` added, and a choice score stored as null (the
    strategy excluded a token, so the choice's log-likelihood is -inf) spelled `"-inf"`, never left ambiguous."""
    out = dict(row)
    if out.get("scores") is not None:
        out["scores"] = [NEG_INF if x is None else x for x in out["scores"]]
    out["gold"] = gold
    return out


def sample_csv_cells(key: str, row: dict[str, Any]) -> list[Any]:
    """One CSV line of a sample row (`key`: the run's strategy key); JSON for the list/dict columns, -inf scores
    written `"-inf"` (rows not passed through export_row are converted here)."""
    row = row if "gold" in row else export_row(row)
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
    """(strategy key, row) for every stored sample row of `runs`, read `page_size` rows per session, each as
    export_row makes it (with its sample's gold answer, read page by page too)."""
    for key, run_id in runs:
        start = 0
        while True:
            with session_scope(settings) as s:
                rows = store.sample_rows(s, run_id, start, limit=page_size)
                golds = _golds(s, run_id, rows)
            for row in rows:
                yield key, export_row(row, golds.get(row["sample_index"]))
            if len(rows) < page_size:
                break
            start = rows[-1]["sample_index"] + 1


def _golds(session: Any, run_id: int, rows: list[dict[str, Any]]) -> dict[int, Any]:
    """Gold answers of the samples `rows` cover (one range read of the run's dataset)."""
    if not rows:
        return {}
    from services.db.models import Job, Run

    dataset_id = session.query(Job.dataset_id).join(Run, Run.job_id == Job.id).filter(Run.id == run_id).scalar()
    lo, hi = rows[0]["sample_index"], rows[-1]["sample_index"] + 1
    return {lo + i: gold_of(x) for i, x in enumerate(store.load_samples(session, dataset_id, lo, hi))}
