"""Thin cached wrappers over the store / view functions: the only way the dashboard's pages touch the database.

Every reader takes the database URL as its first argument, so the Streamlit cache never mixes two databases
(tests point the app at several). Results are cached for a few seconds (`RESULTS_TTL`); live job progress for
one second. `db_status` tells the app whether there is a usable database at all (missing, empty, out of date,
unreachable) before any page queries it.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import streamlit as st
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from services.db import store, views
from services.settings import Settings

RESULTS_TTL = 10
LIVE_TTL = 1


def settings() -> Settings:
    """Fresh settings each rerun (cheap), so a changed environment is seen without restarting."""
    return Settings()


def database_url() -> str:
    return settings().database_url


def display_url(url: str) -> str:
    """The URL with any password masked (safe to show)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given, minus nothing secret we can find
        return url.split("@")[-1]


@contextmanager
def _session(url: str) -> Iterator[Session]:
    from services.db.session import session_scope

    with session_scope(Settings(database_url=url)) as s:
        yield s


# ---------------------------------------------------------------------------------------------------------------
# Database state


@dataclass(frozen=True)
class DbStatus:
    state: str  # ok | missing | empty | outdated | down
    message: str

    @property
    def ok(self) -> bool:
        return self.state == "ok"


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser()


def check_db(url: str) -> DbStatus:
    """Whether the database at `url` exists, is reachable and is at the Alembic head (no caching)."""
    from services.db.schema import current_revision, head_revision
    from services.db.session import get_engine

    where = display_url(url)
    try:
        path = _sqlite_path(url)
    except Exception as e:  # noqa: BLE001 - a malformed TAD_DATABASE_URL
        return DbStatus("down", f"TAD_DATABASE_URL is not a valid database URL ({type(e).__name__}: {e}).")
    if path is not None and not path.is_file():
        return DbStatus("missing", f"No results database yet at `{path}`. Create it with `tad db upgrade` "
                                   "(or run `make demo`, which creates and fills it).")
    try:
        have = current_revision(get_engine(Settings(database_url=url)))
    except Exception as e:  # noqa: BLE001 - unreachable server, refused connection, bad credentials...
        detail = str(getattr(e, "orig", None) or e).strip().splitlines()
        first = detail[0] if detail else type(e).__name__
        return DbStatus("down", f"Cannot reach the results database at `{where}`: {first}. Check that the "
                                "database server is running and that TAD_DATABASE_URL is right.")
    want = head_revision()
    if have is None:
        return DbStatus("empty", f"The database at `{where}` has no schema yet: run `tad db upgrade`.")
    if have != want:
        return DbStatus("outdated", f"The database at `{where}` is at revision {have}, this dashboard expects "
                                    f"{want}: run `tad db upgrade`.")
    return DbStatus("ok", "")


@st.cache_data(ttl=5, show_spinner=False)
def db_status(url: str) -> DbStatus:
    return check_db(url)


def clear_caches() -> None:
    st.cache_data.clear()


# ---------------------------------------------------------------------------------------------------------------
# Results


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def leaderboard(url: str) -> list[store.LeaderboardRow]:
    with _session(url) as s:
        return store.leaderboard(s, limit=20_000)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def study_options(url: str) -> list[tuple[str, str]]:
    """(base model, prompt format) pairs that have study cells (services.study)."""
    from services.study import study_formats

    with _session(url) as s:
        return study_formats(s)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def study(url: str, base: str, fmt: str) -> list[Any]:
    from services.study import study_cells

    with _session(url) as s:
        return study_cells(s, base=base, fmt=fmt)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def runs(url: str, dataset_id: int | None = None, adapter_name: str | None = None) -> list[views.RunRow]:
    with _session(url) as s:
        return views.list_runs(s, dataset_id=dataset_id, adapter_name=adapter_name)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def datasets(url: str) -> list[store.DatasetInfo]:
    with _session(url) as s:
        return store.list_datasets(s)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def adapters(url: str) -> list[store.AdapterInfo]:
    with _session(url) as s:
        return store.list_adapters(s)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def regression_checks(url: str, adapter_name: str) -> list[store.RegressionCheckInfo]:
    with _session(url) as s:
        return store.regression_checks(s, adapter_name)


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def gate_runs(url: str, adapter_name: str) -> list[store.GateRunInfo]:
    """The gates queued for this family's versions, newest first (live: a verdict shows as soon as it lands)."""
    with _session(url) as s:
        return store.gate_runs(s, adapter_name=adapter_name)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def paired(url: str, run_a: int, run_b: int, norm: bool = False) -> list[views.PairedOutcome]:
    with _session(url) as s:
        return views.paired_outcomes(s, run_a, run_b, norm=norm)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def error_indices(url: str, run_id: int) -> set[int]:
    with _session(url) as s:
        return views.error_indices(s, run_id)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def run_diff(url: str, run_a: int, run_b: int, limit: int = 500,
             changes: tuple[str, ...] | None = None) -> store.RunDiff:
    with _session(url) as s:
        return store.run_diff(s, run_a, run_b, only_changed=True, limit=limit, changes=changes)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def samples_at(url: str, dataset_id: int, indices: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    with _session(url) as s:
        return views.samples_at(s, dataset_id, indices)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def kv_stats(url: str, run_id: int) -> list[views.KvSampleRow]:
    with _session(url) as s:
        return views.kv_sample_stats(s, run_id)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def sample_result(url: str, run_id: int, sample_index: int) -> dict[str, Any] | None:
    with _session(url) as s:
        return views.sample_result(s, run_id, sample_index)


@st.cache_data(ttl=RESULTS_TTL, show_spinner=False)
def job(url: str, job_id: int) -> store.JobInfo:
    with _session(url) as s:
        return store.get_job(s, job_id)


# ---------------------------------------------------------------------------------------------------------------
# Live state (short cache: the jobs page refreshes every couple of seconds)


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def job_progress(url: str, limit: int = 50) -> list[views.JobProgress]:
    with _session(url) as s:
        return views.job_progress(s, limit=limit)


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def shards(url: str, job_id: int) -> list[store.ShardInfo]:
    with _session(url) as s:
        return store.job_shards(s, job_id)


@st.cache_data(ttl=60, show_spinner=False)
def clock_offset(url: str) -> float:
    """Seconds the database's clock is ahead of this host's. Heartbeats and shard starts carry the database's
    time (services.db.dialect.db_now), so ages on the live page are read on that clock: with this host's, a
    dashboard whose clock ran a minute ahead showed every live worker as silent."""
    from services.db.dialect import db_now

    with _session(url) as s:
        before = time.time()
        remote = db_now(s).timestamp()
        after = time.time()
    return remote - (before + after) / 2


def now(url: str) -> datetime:
    """The database's time now (see clock_offset)."""
    return datetime.now(timezone.utc) + timedelta(seconds=clock_offset(url))


@st.cache_data(ttl=LIVE_TTL, show_spinner=False)
def workers(url: str) -> list[store.WorkerInfo]:
    with _session(url) as s:
        return store.list_workers(s)


def cancel_job(url: str, job_id: int) -> store.JobInfo:
    """The one write the live page makes: ask a job to stop (store.request_cancel), then drop the cached reads."""
    with _session(url) as s:
        info = store.request_cancel(s, job_id)
    clear_caches()
    return info


def mark_job_failed(url: str, job_id: int, error: str) -> None:
    """Record that a job the dashboard ran in its own process failed (store.mark_job_failed), for the Live jobs
    page; the other write besides cancel."""
    with _session(url) as s:
        store.mark_job_failed(s, job_id, error)
    clear_caches()


# ---------------------------------------------------------------------------------------------------------------
# Token decoding for the knowledge-vector token view (per-step entries store token ids)


@st.cache_resource(show_spinner=False)
def tokenizer_for(base: str) -> Any | None:
    """The base model's tokenizer when it is already on disk (never downloads or converts a model), else None."""
    try:
        from tad_core.models import KNOWN_MODELS
        from tad_core.paths import cache_dir

        if base in KNOWN_MODELS:
            model_dir = cache_dir() / "models" / KNOWN_MODELS[base].name
        else:
            model_dir = Path(base).expanduser()
        if not (model_dir / "tokenizer_config.json").is_file():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:  # noqa: BLE001 - decoding is a nicety: fall back to showing token ids
        return None
