"""Submission form: the same request and validation as `tad submit` (services.planning.plan_job), guarded by the
submit token when TAD_SUBMIT_TOKEN is set. A JSONL upload is checked with tad_core's validator (and the
deployment's limits) before anything is written; on any error nothing is stored and every problem is listed.

A valid job is either queued for the Celery workers (as `tad submit`) or, in embedded mode, executed in a
background thread of the dashboard process through the workers' code path (`run_job_embedded`, as `tad run`).
"""
from __future__ import annotations

import hashlib
import logging
import re
import threading
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard import data
from dashboard.views.common import md
from services.settings import Settings

log = logging.getLogger(__name__)

MODES = {"workers": "Queue for the workers (tad submit)", "embedded": "Run in the dashboard process (tad run)"}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def save_upload(name: str, content: bytes, settings: Settings) -> Path:
    """Validate an uploaded canonical JSONL file and keep it under the cache (content-addressed, so the job's
    dataset source stays readable); raises DatasetValidationError listing every problem (nothing written)."""
    from tad_core.datasets.validate import validate_jsonl
    from tad_core.paths import atomic_target, cache_subdir

    from services.dataset_input import dataset_limits

    validate_jsonl(content, dataset_limits(settings))
    stem = _SAFE_NAME.sub("_", Path(name).stem).strip("._") or "upload"
    digest = hashlib.sha256(content).hexdigest()
    out = cache_subdir("uploads", digest[:16]) / f"{stem}.jsonl"
    if not out.is_file():
        with atomic_target(out) as tmp:
            tmp.write_bytes(content)
    return out


def _start_embedded(job_id: int, settings: Settings) -> None:
    from services.shard_runner import run_job_embedded

    def _run() -> None:
        try:
            run_job_embedded(job_id, settings)
        except Exception as e:  # noqa: BLE001 - recorded on the job so the Live jobs page shows it
            log.exception("embedded job %s failed", job_id)
            data.mark_job_failed(settings.database_url, job_id, f"{type(e).__name__}: {e}")

    threading.Thread(target=_run, name=f"tad-job-{job_id}", daemon=True).start()


def _registered_datasets() -> list[str]:
    try:
        from tad_core.datasets import REGISTRY

        return sorted(REGISTRY)
    except Exception:  # noqa: BLE001
        return []


def _known_models() -> list[str]:
    try:
        from tad_core.models import KNOWN_MODELS

        return list(KNOWN_MODELS)
    except Exception:  # noqa: BLE001
        return []


def render() -> None:
    st.title("Submit a job")
    settings = data.settings()
    url = data.database_url()
    st.caption("Same checks as `tad submit`: strategies and parameters, generation config, model paths inside "
               "TAD_MODEL_ROOTS, the adapter, and the dataset; nothing is stored unless all pass.")
    registered = [f"{a.name}:{a.version}" for a in data.adapters(url)]
    with st.form("submit_form"):
        source = st.radio("Dataset", ["registered", "upload", "server file"], horizontal=True, key="sub_source",
                          format_func={"registered": "registered dataset", "upload": "upload JSONL",
                                       "server file": "JSONL path on the server"}.__getitem__)
        c1, c2, c3 = st.columns([2, 1, 1])
        ds_name = c1.selectbox("Registered dataset (used when 'registered dataset' is picked)",
                               _registered_datasets() or ["–"], key="sub_registered")
        split = c2.text_input("Split", "val", key="sub_split")
        limit = c3.number_input("Limit (0 = all)", min_value=0, value=0, step=10, key="sub_limit")
        upload = st.file_uploader(
            f"Canonical JSONL (at most {settings.max_dataset_rows} rows, {settings.max_dataset_bytes // 1_000_000} MB, "
            f"{settings.max_sample_chars} characters per field)", type=["jsonl"], key="sub_upload")
        ds_path = st.text_input("JSONL path on the server", key="sub_path", placeholder="/data/my_eval.jsonl")
        st.divider()
        m1, m2, m3 = st.columns(3)
        base = m1.text_input("Base model (registered name or directory)",
                             (_known_models() or ["smollm2-135m-instruct"])[0], key="sub_base")
        adapter = m2.text_input("Adapter: directory, or NAME:VERSION / NAME:latest", key="sub_adapter",
                                help="registered: " + (", ".join(registered) or "none yet"))
        finetuned = m3.text_input("or fully fine-tuned model directory", key="sub_finetuned")
        strategies = st.text_area("Strategies, one spec per line (comma lists sweep a parameter)",
                                  "ft\ntad:alpha=0.5,1,2", key="sub_strategies")
        g1, g2, g3, g4, g5 = st.columns(5)
        batch_size = g1.number_input("Batch size", min_value=1, value=8, key="sub_batch")
        max_new = g2.number_input("Max new tokens", min_value=1, value=64, key="sub_max_new")
        temperature = g3.number_input("Temperature (0 = greedy)", min_value=0.0, value=0.0, key="sub_temp")
        seed = g4.number_input("Seed", value=0, step=1, key="sub_seed")
        shard_size = g5.number_input("Shard size (0 = TAD_SHARD_SIZE)", min_value=0, value=0, key="sub_shard")
        u1, u2, u3 = st.columns(3)
        user = u1.text_input("Submitted by", key="sub_user")
        token = u2.text_input("Submit token", type="password", key="sub_token",
                              disabled=settings.submit_token is None,
                              help="required: this deployment sets TAD_SUBMIT_TOKEN" if settings.submit_token
                              else "not required here")
        mode = u3.radio("Execution", list(MODES), format_func=MODES.__getitem__, key="sub_mode",
                        index=1 if settings.is_sqlite else 0)
        submitted = st.form_submit_button("Submit", type="primary")
    if submitted:
        _submit(settings, source=source, ds_name=ds_name, ds_path=ds_path, upload=upload, split=split,
                limit=int(limit), base=base, adapter=adapter, finetuned=finetuned, strategies=strategies,
                config={"batch_size": int(batch_size), "max_new_tokens": int(max_new),
                        "temperature": float(temperature), "seed": int(seed)},
                shard_size=int(shard_size), user=user, token=token, mode=mode)


def _submit(settings: Settings, *, source: str, ds_name: str, ds_path: str, upload: Any, split: str, limit: int,
            base: str, adapter: str, finetuned: str, strategies: str, config: dict[str, Any], shard_size: int,
            user: str, token: str, mode: str) -> None:
    from services.planning import plan_job
    from services.queueing import QueueUnavailable, enqueue_or_fail
    from services.security import SecurityError, check_submit_token
    from services.submit_request import SubmissionError, SubmitRequest
    from tad_core.datasets.validate import DatasetValidationError

    try:
        check_submit_token(settings, token or None)  # before the upload is written anywhere
    except SecurityError as e:
        st.error(f"Submission refused, nothing was stored: {md(e)}", icon=":material/lock:")
        return
    if source == "upload":
        if upload is None:
            st.error("Submission rejected, nothing was stored: choose a JSONL file to upload.")
            return
        try:
            dataset = str(save_upload(upload.name, upload.getvalue(), settings))
        except DatasetValidationError as e:
            st.error("Submission rejected, nothing was stored: the uploaded dataset is invalid.\n\n"
                     + "\n".join(f"- {md(err)}" for err in e.errors))
            return
    elif source == "server file":
        dataset = ds_path.strip()
    else:
        dataset = ds_name
    source_name = f"upload:{upload.name}" if source == "upload" else None
    specs = [line.strip() for line in strategies.splitlines() if line.strip()]
    req = SubmitRequest(dataset=dataset, strategies=specs, base=base.strip(), adapter=adapter.strip() or None,
                        finetuned=finetuned.strip() or None, split=split.strip() or "val", limit=limit or None,
                        config=config, submitted_by=user.strip(), token=token or None,
                        shard_size=shard_size or None, source_name=source_name)
    try:
        plan = plan_job(req, settings)
    except SubmissionError as e:
        st.error("Submission rejected, nothing was stored:\n\n" + "\n".join(f"- {md(err)}" for err in e.errors))
        return
    except SecurityError as e:
        st.error(f"Submission refused, nothing was stored: {md(e)}", icon=":material/lock:")
        return
    job = plan.job
    what = f"job {job.id}: {job.n_samples} samples × {len(plan.runs)} strategies in {len(plan.shards)} shards"
    if mode == "embedded":
        _start_embedded(job.id, settings)
        st.success(f"{what}, running in the dashboard process. Follow it on the Live jobs page.")
    else:
        try:
            sent = enqueue_or_fail(job.id, settings)
        except QueueUnavailable as e:
            st.error(f"{what} was stored but the broker is unreachable ({md(e.cause)}); the job is marked failed.")
            return
        st.success(f"{what}, {sent} shards queued for the workers. Follow it on the Live jobs page.")
    data.clear_caches()
    st.session_state["last_job_id"] = job.id
