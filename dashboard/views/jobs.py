"""Live jobs: queued / running / finished jobs with progress bars, throughput and errors, the shards of one job,
and the workers' heartbeats. While a job is queued or running the page refreshes itself every few seconds
(`st.fragment(run_every=...)`), so streamed results appear without a reload."""
from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.views.common import ago, as_utc, md
from services.db.views import JobProgress

REFRESH_S = 2.0
STATUS_ICON = {"queued": "⏳", "running": "▶️", "done": "✅", "failed": "❌", "partial": "⚠️", "cancelled": "⏹️"}


def throughput(job: JobProgress, now: datetime | None = None) -> float | None:
    """Samples per second since the job started (up to its end when finished)."""
    start = as_utc(job.started_at)
    if start is None or job.samples_done == 0:
        return None
    end = as_utc(job.finished_at) or now or datetime.now(timezone.utc)
    seconds = (end - start).total_seconds()
    return job.samples_done / seconds if seconds > 0 else None


def jobs_frame(jobs: list[JobProgress], now: datetime) -> pd.DataFrame:
    """One row per job; ages and rates read at `now` (the database's time: data.now)."""
    records = []
    for j in jobs:
        rate = throughput(j, now)
        eta = (j.n_samples - j.samples_done) / rate if rate and j.active else None
        records.append({
            "job": j.id, "status": f"{STATUS_ICON.get(j.status, '')} {j.status}", "progress": j.fraction,
            "samples": f"{j.samples_done}/{j.n_samples}",
            "shards": f"{j.shards_done} done, {j.shards_running} running, {j.shards_failed} failed / {j.n_shards}",
            "samples/s": rate, "eta (s)": eta, "dataset": f"{j.dataset}:{j.split}", "model": j.model,
            "strategies": ", ".join(j.strategies), "owner": j.owner or "-", "by": j.submitted_by, "submitted": ago(j.created_at, now),
            "error": j.error or ""})
    return pd.DataFrame.from_records(records)


def _jobs_body(url: str) -> None:
    jobs = data.job_progress(url)
    if not jobs:
        st.info("No jobs yet: submit one on the Submit page, or with `tad submit` / `tad run`.")
        return
    now = data.now(url)
    active = [j for j in jobs if j.active]
    counts = pd.Series([j.status for j in jobs]).value_counts()
    cols = st.columns(5)
    for col, status in zip(cols, ("queued", "running", "done", "partial", "failed")):
        col.metric(status, int(counts.get(status, 0)))
    for j in active:
        rate = throughput(j, now)
        st.progress(j.fraction, text=f"job {j.id} · {j.status} · {md(j.dataset)}:{md(j.split)} · {md(j.model)} · "
                                     f"{j.samples_done}/{j.n_samples} samples"
                                     + (f" · {rate:.2f} samples/s" if rate else ""))
    st.dataframe(jobs_frame(jobs, now), hide_index=True, width="stretch", column_config={
        "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
        "samples/s": st.column_config.NumberColumn(format="%.2f"),
        "eta (s)": st.column_config.NumberColumn(format="%.0f")})
    for j in jobs:
        if j.error:
            st.error(f"job {j.id} ({j.status}): {md(j.error)}", icon=":material/error:")

    st.subheader("Workers")
    workers = data.workers(url)
    if not workers:
        st.caption("No worker has reported yet (embedded runs execute in the CLI / dashboard process; team mode: "
                   "`tad worker`).")
    else:
        limit = 3 * data.settings().heartbeat_interval
        st.dataframe(pd.DataFrame.from_records([{
            "worker": w.worker, "pid": w.pid,
            "state": "alive" if (now - as_utc(w.last_seen)).total_seconds() <= limit else "silent",
            "last seen": ago(w.last_seen, now), "job": w.job_id, "shard": w.shard_id,
            "up since": ago(w.started_at, now)} for w in workers]), hide_index=True, width="stretch")
        st.caption(f"alive = heartbeat within {limit:.0f} s (3 × TAD_HEARTBEAT_INTERVAL)")

    st.subheader("Shards of a job")
    job_id = st.selectbox("Job", [j.id for j in jobs], key="jobs_detail",
                          format_func=lambda i: f"job {i}")
    selected = next(j for j in jobs if j.id == int(job_id))
    if selected.active:
        _cancel_controls(url, selected)
    shards = data.shards(url, int(job_id))
    if shards:
        st.dataframe(pd.DataFrame.from_records([{
            "range": f"[{s.start}, {s.stop})", "status": s.status, "attempts": s.attempts,
            "done": f"{s.samples_done}/{s.stop - s.start}", "worker": s.worker or "", "error": s.error or ""}
            for s in shards]), hide_index=True, width="stretch")
    st.caption(f"updated {datetime.now().strftime('%H:%M:%S')}"
               + (f" · refreshing every {REFRESH_S:.0f} s while jobs run" if active else ""))
    was_active = st.session_state.get("jobs_active", False)
    st.session_state["jobs_active"] = bool(active)
    if was_active and not active:
        st.rerun()  # the last job finished: rerun the page so the fragment stops polling


def _cancel_controls(url: str, job: JobProgress) -> None:
    """Cancel the selected job (queued shards stop now, running ones at their next batch boundary), asking for the
    submit token when the deployment sets TAD_SUBMIT_TOKEN: cancelling is as privileged as submitting."""
    from services.db import store
    from services.security import SecurityError, check_submit_token

    settings = data.settings()
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    token = c1.text_input("Submit token", type="password", key="cancel_token",
                          disabled=settings.submit_token is None,
                          help="required: this deployment sets TAD_SUBMIT_TOKEN" if settings.submit_token
                          else "not required: TAD_SUBMIT_TOKEN is not set")
    if not c2.button(f"Cancel job {job.id}", key="cancel_job", icon=":material/stop_circle:"):
        return
    try:
        check_submit_token(settings, token or None)
        info = data.cancel_job(url, job.id)
    except (SecurityError, store.NotFound) as exc:
        st.error(f"job {job.id} not cancelled: {md(exc)}")
        return
    st.success(f"job {job.id}: {info.status}"
               + (" (running shards stop at their next batch)" if info.status == "running" else ""))


def render() -> None:
    st.title("Live jobs")
    url = data.database_url()
    active = any(j.active for j in data.job_progress(url))
    st.fragment(_jobs_body, run_every=REFRESH_S if active else None)(url)
