"""The FastAPI application: `create_app(settings)`; `tad serve` runs it under uvicorn.

Every endpoint calls the functions the CLI calls (services.planning.plan_job, services.queueing.enqueue_or_fail /
requeue_job, services.db.store, services.export), so a rule lives once. Errors a caller can fix are 4xx with the message the
service raised: a rejected submission is 422 with every problem listed and nothing stored, an unknown job 404,
an upload over TAD_MAX_DATASET_BYTES 413; an unreachable database or broker is 503.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool

from services.api.auth import current_principal, require_admin, require_job_owner, settings_of
from services.api.schemas import (JobOut, RegisterBody, RequeuedJob, ResultsOut, SubmitBody, SubmitOptions,
                                  SubmittedJob, gate_out, job_out)
from services.db import store, users
from services.db.models import JOB_STATUSES
from services.db.schema import SchemaOutOfDate
from services.db.session import session_scope
from services.export import (DEFAULT_PAGE, SAMPLE_CSV_COLUMNS, iter_sample_rows, job_run_keys, plain,
                             sample_csv_cells)
from services.gates import newest_per_suite
from services.planning import plan_validated
from services.queueing import QueueUnavailable, enqueue_or_fail, requeue_job
from services.refs import MAX_ID
from services.registration import register_adapter_dir
from services.regress import GateError
from services.security import SecurityError
from services.settings import Settings, get_settings
from services.submission import validate_request
from services.submit_request import SubmissionError

JobId = PathParam(ge=1, le=MAX_ID, description="job id")
UPLOAD_CHUNK = 1 << 20
PLAN_ATTEMPTS = 3  # concurrent first submissions of one dataset race on its unique hash: the loser plans again


def _error_handlers(app: FastAPI) -> None:
    """Map the services' exceptions to status codes: the caller's mistakes are 4xx, outages 503, never 500."""

    @app.exception_handler(SubmissionError)
    async def _submission(_: Request, exc: SubmissionError) -> JSONResponse:
        return JSONResponse({"detail": "submission rejected, nothing was stored", "errors": exc.errors}, 422)

    @app.exception_handler(GateError)
    async def _gate(_: Request, exc: GateError) -> JSONResponse:
        return JSONResponse({"detail": "registration refused, nothing was stored", "errors": [str(exc)]}, 422)

    @app.exception_handler(SecurityError)
    async def _security(_: Request, exc: SecurityError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "errors": [str(exc)]}, 400)

    @app.exception_handler(users.UserError)
    async def _user(_: Request, exc: users.UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)

    @app.exception_handler(store.NotFound)
    async def _not_found(_: Request, exc: store.NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 404)

    @app.exception_handler(DataError)
    async def _data(_: Request, exc: DataError) -> JSONResponse:
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[:1]
        return JSONResponse({"detail": f"a value was refused by the database: {' '.join(first)}"}, 422)

    @app.exception_handler(IntegrityError)
    async def _conflict(_: Request, exc: IntegrityError) -> JSONResponse:
        return JSONResponse({"detail": "conflicting concurrent change; retry the request"}, 409)

    @app.exception_handler(QueueUnavailable)
    async def _queue(_: Request, exc: QueueUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "job_id": exc.job_id}, 503)

    @app.exception_handler(SchemaOutOfDate)
    async def _schema(_: Request, exc: SchemaOutOfDate) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503)

    for exc_type in (OperationalError, InterfaceError, PoolTimeout):
        @app.exception_handler(exc_type)
        async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": "database unavailable; try again later"}, 503)

    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisConnectionError

    for exc_type in (BrokerError, RedisConnectionError):
        @app.exception_handler(exc_type)
        async def _broker(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": f"broker unavailable ({type(exc).__name__}); what was stored before the "
                                           "failure is kept, and a job or gate that could not be queued is marked "
                                           "failed (error): try again later"}, 503)


def _owned(settings: Settings, jobs: list[store.JobInfo]) -> list[dict[str, Any]]:
    with session_scope(settings) as s:
        owners = users.owner_names(s, [j.id for j in jobs])
    return [job_out(j, owners.get(j.id)) for j in jobs]


def _get_job(settings: Settings, job_id: int) -> dict[str, Any]:
    with session_scope(settings) as s:
        job = store.get_job(s, job_id)
        owner = users.owner_names(s, [job_id]).get(job_id)
    return job_out(job, owner)


def _submit(settings: Settings, opts: SubmitOptions, dataset: str, principal: users.Principal,
            source_name: str | None = None) -> dict[str, Any]:
    """Plan (validate everything, store) and queue a job for the workers, owned by the caller: the same
    functions as `tad submit` (`source_name`: what the datasets table records for an uploaded file)."""
    token = settings.submit_token.get_secret_value() if settings.submit_token else None
    valid = validate_request(opts.to_request(dataset, principal.user, principal.user_id, token, source_name),
                             settings)
    for attempt in range(1, PLAN_ATTEMPTS + 1):
        try:
            plan = plan_validated(valid, settings)
            break
        except IntegrityError:  # a concurrent first submission registered the same dataset/model/adapter
            if attempt == PLAN_ATTEMPTS:
                raise
    sent = enqueue_or_fail(plan.job.id, settings)
    return {**_get_job(settings, plan.job.id), "shards_queued": sent}


def _registered_dataset(name: str) -> None:
    """The JSON endpoint takes registered dataset names only: a server-side path would expose the server's
    files; local files go through the upload endpoint."""
    from tad_core.datasets import REGISTRY

    if name not in REGISTRY:
        raise SubmissionError([f"dataset {name!r}: not a registered dataset ({', '.join(sorted(REGISTRY))}); "
                               "upload a JSONL file to POST /jobs/upload instead"])


def _text(value: str, field: str) -> str:
    """`value`, or 422 naming `field` when it holds a NUL character (the database would refuse it)."""
    if "\x00" in value:
        raise HTTPException(422, f"{field}: must not contain NUL characters")
    return value


def _safe_stem(filename: str | None) -> str:
    stem = Path(filename or "upload").name.removesuffix(".jsonl")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).strip("._")[:100] or "upload"


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"dataset upload over the limit of {limit} bytes (TAD_MAX_DATASET_BYTES); nothing "
                              "was stored")


async def _save_upload(upload: UploadFile, dest: Path, limit: int) -> None:
    """Copy an upload to `dest`, refusing it (413) as soon as it passes `limit` bytes."""
    size = 0
    with open(dest, "wb") as out:
        while chunk := await upload.read(UPLOAD_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            out.write(chunk)


def _csv_lines(rows: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[str]:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(SAMPLE_CSV_COLUMNS)
    for n, (key, row) in enumerate(rows, start=1):
        writer.writerow(sample_csv_cells(key, row))
        if n % 200 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _jsonl_lines(rows: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[str]:
    for key, row in rows:
        yield json.dumps({"strategy": key, **plain(row)}) + "\n"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for one deployment (its database, broker and limits are `settings`)."""
    settings = settings or get_settings()
    app = FastAPI(title="TaD-Eval API", version="1",
                  description="Submit evaluation jobs, follow them and read their results. Authenticate with "
                              "`Authorization: Bearer <token>` (`tad tokens create NAME`).")
    app.state.settings = settings
    _error_handlers(app)

    @app.middleware("http")
    async def _upload_size(request: Request, call_next: Any) -> Any:
        """Refuse an announced over-size upload before reading its body (the endpoint counts bytes too)."""
        if request.url.path == "/jobs/upload":
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > settings.max_dataset_bytes + 65536:
                return JSONResponse({"detail": _too_large(settings.max_dataset_bytes).detail}, 413)
        return await call_next(request)

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        """Liveness: the process answers (no authentication, no database)."""
        return {"status": "ok"}

    @app.post("/jobs", status_code=201, response_model=SubmittedJob, tags=["jobs"])
    def submit(body: SubmitBody, request: Request,
               principal: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """Validate and queue a job on a registered dataset; 422 lists every problem (nothing stored)."""
        _registered_dataset(body.dataset)
        return _submit(settings_of(request), body, body.dataset, principal)

    @app.post("/jobs/upload", status_code=201, response_model=SubmittedJob, tags=["jobs"])
    async def submit_upload(request: Request, file: UploadFile = File(description="dataset, JSONL"),
                            options: str = Form("{}", description="JSON object: the fields of POST /jobs except "
                                                                  "dataset"),
                            principal: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """Validate and queue a job on an uploaded JSONL dataset (at most TAD_MAX_DATASET_BYTES, else 413)."""
        cfg = settings_of(request)
        try:
            opts = SubmitOptions.model_validate_json(options or "{}")
        except ValidationError as e:
            raise SubmissionError([f"options: {'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"
                                   for err in e.errors()]) from None
        shown = _text(Path(file.filename or "upload.jsonl").name, "file name")
        with tempfile.TemporaryDirectory(prefix="tad-upload-") as tmp:
            path = Path(tmp) / f"{_safe_stem(file.filename)}.jsonl"
            await _save_upload(file, path, cfg.max_dataset_bytes)
            try:
                return await run_in_threadpool(_submit, cfg, opts, str(path), principal, f"upload:{shown}")
            except SubmissionError as e:  # name the uploaded file, not the server's temporary copy
                raise SubmissionError([m.replace(str(path), shown) for m in e.errors]) from None

    @app.get("/jobs", response_model=list[JobOut], tags=["jobs"])
    def list_jobs(request: Request, limit: int = Query(20, ge=1, le=500),
                  status: Literal[JOB_STATUSES] | None = Query(None),  # type: ignore[valid-type]
                  _: users.Principal = Depends(current_principal)) -> list[dict[str, Any]]:
        """Recent jobs, newest first, with their owners."""
        cfg = settings_of(request)
        with session_scope(cfg) as s:
            rows = store.list_jobs(s, limit=limit, status=status)
        return _owned(cfg, rows)

    @app.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def get_job(request: Request, job_id: int = JobId,
                _: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """A job's status and progress."""
        return _get_job(settings_of(request), job_id)

    @app.get("/jobs/{job_id}/events", tags=["jobs"],
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "`progress` events (the job as JSON) while it changes, then one "
                                             "`end` event (or `timeout`)"}})
    async def job_events(request: Request, job_id: int = JobId,
                         interval: float = Query(1.0, ge=0.1, le=60, description="seconds between polls"),
                         timeout: float = Query(600.0, gt=0, le=3600, description="seconds before the stream "
                                                                                  "ends anyway"),
                         _: users.Principal = Depends(current_principal)) -> StreamingResponse:
        """Server-sent events of a job's progress until it ends (clients without SSE poll GET /jobs/{id})."""
        cfg = settings_of(request)
        first = await run_in_threadpool(_get_job, cfg, job_id)

        async def stream() -> AsyncIterator[str]:
            job, last, deadline = first, "", time.monotonic() + timeout
            while True:
                payload = json.dumps(job)
                if payload != last:
                    yield f"event: progress\ndata: {payload}\n\n"
                    last = payload
                if job["finished"]:
                    yield f"event: end\ndata: {payload}\n\n"
                    return
                if time.monotonic() > deadline or await request.is_disconnected():
                    yield "event: timeout\ndata: {}\n\n"
                    return
                await asyncio.sleep(interval)
                job = await run_in_threadpool(_get_job, cfg, job_id)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
    def cancel(request: Request, job_id: int = JobId,
               principal: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """Cancel a job (its owner or an admin): queued shards stop now, running ones within seconds."""
        cfg = settings_of(request)
        require_job_owner(cfg, job_id, principal)
        with session_scope(cfg) as s:
            store.request_cancel(s, job_id)
        return _get_job(cfg, job_id)

    @app.post("/jobs/{job_id}/requeue", response_model=RequeuedJob, tags=["jobs"])
    def requeue(request: Request, job_id: int = JobId,
                principal: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """Send a job's unfinished shards to the broker again (its owner or an admin)."""
        cfg = settings_of(request)
        require_job_owner(cfg, job_id, principal)
        try:
            sent = requeue_job(job_id, cfg)
        except store.NotFound:
            raise
        except Exception as e:  # noqa: BLE001 - broker unreachable: nothing was requeued
            raise HTTPException(503, f"could not reach the broker ({type(e).__name__}); nothing was requeued") from e
        return {"job_id": job_id, "shards_sent": sent}

    @app.get("/jobs/{job_id}/results", response_model=ResultsOut, tags=["results"])
    def results(request: Request, job_id: int = JobId,
                _: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """A job and its leaderboard (one row per strategy run, with statistics)."""
        cfg = settings_of(request)
        job = _get_job(cfg, job_id)
        with session_scope(cfg) as s:
            board = store.leaderboard(s, job_ids=[job_id])
        return {"job": job, "leaderboard": [{**plain(r), "label": r.label} for r in board]}

    @app.get("/jobs/{job_id}/samples", tags=["results"],
             responses={200: {"content": {"application/x-ndjson": {}, "text/csv": {}},
                              "description": "per-sample rows, streamed"}})
    def samples(request: Request, job_id: int = JobId,
                format: Literal["jsonl", "csv"] = Query("jsonl"),  # noqa: A002 - the query parameter's name
                page_size: int = Query(DEFAULT_PAGE, ge=1, le=10_000),
                _: users.Principal = Depends(current_principal)) -> StreamingResponse:
        """Every per-sample row of the job, streamed page by page (JSON lines or the CSV of `tad results --csv`)."""
        cfg = settings_of(request)
        rows = iter_sample_rows(cfg, job_run_keys(cfg, job_id), page_size)
        if format == "csv":
            return StreamingResponse(_csv_lines(rows), media_type="text/csv",
                                     headers={"Content-Disposition": f'attachment; filename="job{job_id}.csv"'})
        return StreamingResponse(_jsonl_lines(rows), media_type="application/x-ndjson")

    @app.get("/adapters", tags=["adapters"])
    def adapters(request: Request, name: str | None = Query(None, max_length=200),
                 _: users.Principal = Depends(current_principal)) -> list[dict[str, Any]]:
        """Registered adapter versions (optionally of one family)."""
        with session_scope(settings_of(request)) as s:
            rows = store.list_adapters(s, _text(name, "name") if name else None)
            gates = newest_per_suite(store.gate_runs(s, candidate_ids=[a.id for a in rows])) if rows else {}
        return [{**plain(a), "label": a.label, "gates": [gate_out(g) for g in gates.get(a.id, [])]} for a in rows]

    @app.post("/adapters", status_code=201, tags=["adapters"])
    def register(body: RegisterBody, request: Request,
                 principal: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """Register a server-side adapter directory (inside the model roots) as a version of its family and queue
        its regression gates on the workers (`gate`: suites; none given: the family's gate suites). 422 lists
        what is wrong, and nothing is stored."""
        reg = register_adapter_dir(body.name, _text(body.path, "path"), version=body.version,
                                   base=_text(body.base, "base") if body.base else None,
                                   gate=[_text(g, "gate") for g in body.gate] or None, alpha=body.alpha,
                                   min_effect=body.min_effect, submitted_by=principal.user,
                                   settings=settings_of(request))
        return {"adapter": {**plain(reg.adapter), "label": reg.adapter.label}, "created": reg.created,
                "twins": reg.twins, "warnings": reg.warnings, "gates": [gate_out(g) for g in reg.gates],
                "gates_skipped": reg.gates_skipped}

    @app.get("/gates/{gate_id}", tags=["adapters"])
    def gate(request: Request, gate_id: int = PathParam(ge=1, le=MAX_ID),
             _: users.Principal = Depends(current_principal)) -> dict[str, Any]:
        """A gate queued at registration: its status, and its verdict and check once they land."""
        with session_scope(settings_of(request)) as s:
            return gate_out(store.get_gate_run(s, gate_id))

    @app.post("/adapters/{name}/{version}/promote", tags=["adapters"])
    def promote(request: Request, name: str = PathParam(max_length=200),
                version: int = PathParam(ge=1, le=MAX_ID),
                _: users.Principal = Depends(require_admin)) -> dict[str, Any]:
        """Mark NAME:VERSION as its family's accepted baseline (admin token)."""
        with session_scope(settings_of(request)) as s:
            info = store.promote_adapter(s, _text(name, "name"), version)
        return {**plain(info), "label": info.label}

    @app.get("/suites", tags=["suites"])
    def suites(request: Request, _: users.Principal = Depends(current_principal)) -> list[dict[str, Any]]:
        """Registered regression suites."""
        with session_scope(settings_of(request)) as s:
            return [plain(x) for x in store.list_suites(s)]

    return app
