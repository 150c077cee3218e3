"""The CLI's API mode: `--server URL` (TAD_SERVER_URL) with `--api-token` (TAD_API_TOKEN).

With a server, `tad submit|jobs|status|cancel|requeue|results` speak HTTP only (httpx) and need no database or
broker credentials; the output matches the database mode (same tables, same stdout/stderr split, same exit
codes: 2 for what the user can fix, including a rejected token or another user's job; 3 when the server cannot
be reached or is unavailable).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
import typer

from services.cli.common import EXIT_UNAVAILABLE, EXIT_USAGE, cell, fail, follow_job, print_leaderboard
from services.db.store import AdapterInfo, GateRunInfo, JobInfo, LeaderboardRow
from services.submit_request import SubmitRequest

TIMEOUT_S = 120.0  # a submission validates the whole dataset on the server


class ApiClient:
    """A bearer-authenticated client of one TaD-Eval API server; every failure ends the command with a message."""

    def __init__(self, server: str, token: str | None) -> None:
        if not token:
            fail("--server needs an API token: pass --api-token or set TAD_API_TOKEN (tad tokens create NAME)")
        self.server = server.rstrip("/")
        self.http = httpx.Client(base_url=self.server, headers={"Authorization": f"Bearer {token}"},
                                 timeout=TIMEOUT_S)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; exit with the server's message on a 4xx (2) or 5xx / no answer (3)."""
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            fail(f"API server unavailable at {self.server}: {e} (check --server / TAD_SERVER_URL)", EXIT_UNAVAILABLE)
        _raise_for(resp)
        return resp

    def stream_to(self, path: str, params: dict[str, Any], out: IO[str]) -> None:
        """Copy a streamed response body to `out` as it arrives."""
        try:
            with self.http.stream("GET", path, params=params) as resp:
                _raise_for(resp)
                for text in resp.iter_text():
                    out.write(text)
        except httpx.HTTPError as e:
            fail(f"API server unavailable at {self.server}: {e}", EXIT_UNAVAILABLE)


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    resp.read()  # a streamed response's error body
    try:
        body = resp.json()
    except ValueError:
        body = {"detail": resp.text[:500]}
    detail = body.get("detail") if isinstance(body, dict) else body
    errors = body.get("errors") if isinstance(body, dict) else None
    if resp.status_code == 422 and isinstance(detail, list):  # FastAPI's own validation errors
        errors = [f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail]
        detail = "request rejected, nothing was stored"
    if errors:
        typer.secho(f"error: {detail}:", err=True, fg=typer.colors.RED)
        for line in errors:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(EXIT_USAGE)
    if resp.status_code == 401:
        fail(f"API token rejected: {detail} (check --api-token / TAD_API_TOKEN)")
    fail(f"{detail} (HTTP {resp.status_code})", EXIT_USAGE if resp.status_code < 500 else EXIT_UNAVAILABLE)


def _parse(value: Any, kind: Any) -> Any:
    if isinstance(value, str) and "datetime" in str(kind):
        return datetime.fromisoformat(value)
    return value


def from_json(cls: Any, data: dict[str, Any]) -> Any:
    """A store dataclass (JobInfo, AdapterInfo, GateRunInfo) rebuilt from the API's JSON object, so the database
    mode's printing serves both modes."""
    return cls(**{f.name: _parse(data.get(f.name), f.type) for f in dataclasses.fields(cls) if f.name in data})


def job_from_json(data: dict[str, Any]) -> JobInfo:
    """A JobInfo rebuilt from the API's job object (so the database mode's tables print it)."""
    return from_json(JobInfo, data)


def register_adapter(client: ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    """POST /adapters: register a directory on the server and queue its gates; returns the API's reply with the
    adapter and gates as store dataclasses."""
    reply = client.call("POST", "/adapters", json=body).json()
    return {**reply, "adapter": from_json(AdapterInfo, reply["adapter"]),
            "gates": [from_json(GateRunInfo, g) for g in reply["gates"]]}


def gate(client: ApiClient, gate_id: int) -> GateRunInfo:
    return from_json(GateRunInfo, client.call("GET", f"/gates/{gate_id}").json())


def _row_from_json(data: dict[str, Any]) -> LeaderboardRow:
    names = {f.name for f in dataclasses.fields(LeaderboardRow)}
    return LeaderboardRow(**{k: v for k, v in data.items() if k in names})


def _options(req: SubmitRequest) -> dict[str, Any]:
    return {"strategies": list(req.strategies), "base": req.base, "adapter": req.adapter, "finetuned": req.finetuned,
            "adapter_name": req.adapter_name, "split": req.split, "limit": req.limit, "config": dict(req.config),
            "shard_size": req.shard_size}


def submit(client: ApiClient, req: SubmitRequest) -> None:
    """POST the request: a local .jsonl file is uploaded, anything else is a registered dataset name."""
    path = Path(req.dataset).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        with open(path, "rb") as f:
            resp = client.call("POST", "/jobs/upload", files={"file": (path.name, f, "application/x-ndjson")},
                               data={"options": json.dumps(_options(req))})
    else:
        resp = client.call("POST", "/jobs", json={"dataset": req.dataset, **_options(req)})
    job = resp.json()
    typer.echo(f"job {job['id']}: {job['n_samples']} samples x {len(job['spec'].get('strategies', []))} strategies, "
               f"{job['shards_queued']} shards queued", err=True)
    typer.echo(job["id"])


def jobs(client: ApiClient, limit: int, status: str | None) -> list[JobInfo]:
    params = {"limit": limit, **({"status": status} if status else {})}
    return [job_from_json(d) for d in client.call("GET", "/jobs", params=params).json()]


def get_job(client: ApiClient, job_id: int) -> JobInfo:
    return job_from_json(client.call("GET", f"/jobs/{job_id}").json())


def cancel(client: ApiClient, job_id: int) -> JobInfo:
    return job_from_json(client.call("POST", f"/jobs/{job_id}/cancel").json())


def requeue(client: ApiClient, job_id: int) -> int:
    return int(client.call("POST", f"/jobs/{job_id}/requeue").json()["shards_sent"])


def results(client: ApiClient, job_id: int, as_csv: bool, as_json: bool, output: Path | None,
            lmeval: Path | None) -> None:
    """`tad results` through the API: the leaderboard table, or the samples streamed as CSV, or the JSON
    payload of the database mode."""
    if lmeval is not None:
        fail("--lmeval needs the database (it is not available with --server); use --json or --csv")
    if not (as_csv or as_json):
        data = client.call("GET", f"/jobs/{job_id}/results").json()
        job = job_from_json(data["job"])
        model = job.spec.get("adapter_label") or job.spec.get("finetuned") or job.spec.get("base")
        print_leaderboard([_row_from_json(r) for r in data["leaderboard"]],
                           f"job {job.id} ({job.status}): {cell(model)} on {cell(job.spec.get('dataset'))}:"
                           f"{cell(job.spec.get('split'))}, {job.samples_done}/{job.n_samples} samples")
        return
    out = open(output, "w", newline="") if output else sys.stdout
    try:
        if as_csv:
            client.stream_to(f"/jobs/{job_id}/samples", {"format": "csv"}, out)
            return
        data = client.call("GET", f"/jobs/{job_id}/results").json()
        samples: dict[str, list[dict[str, Any]]] = {r["key"]: [] for r in data["leaderboard"]}
        with client.http.stream("GET", f"/jobs/{job_id}/samples", params={"format": "jsonl"}) as resp:
            _raise_for(resp)
            for line in resp.iter_lines():
                if line.strip():
                    row = json.loads(line)
                    samples.setdefault(row.pop("strategy"), []).append(row)
        job = {k: v for k, v in data["job"].items() if k not in ("owner", "progress", "finished")}
        out.write(json.dumps({"job": job, "leaderboard": data["leaderboard"], "samples": samples}) + "\n")
    finally:
        if output:
            out.close()


def watch(client: ApiClient, job_id: int, interval: float) -> JobInfo:
    """Poll a job until it ends, with the database mode's progress bar."""
    return follow_job(get_job(client, job_id), lambda: get_job(client, job_id), interval)
