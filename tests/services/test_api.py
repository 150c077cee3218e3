"""The HTTP API against real components: `tad serve` (uvicorn) in a subprocess on a free loopback port, a
throw-away Postgres database, a private Redis and real `tad worker` subprocesses; users and tokens are made with
the real `tad users` / `tad tokens` commands.
"""
from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from services.db import store, users
from services.db.session import session_scope
from tests.services.helpers import ApiServer, write_mc_dataset
from tests.services.helpers import tad_cli as tad

# 600 s per test: a real server and worker; a cold torch import on an overloaded 2-core machine takes minutes
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

UPLOAD_LIMIT = 20_000  # TAD_MAX_DATASET_BYTES of the test server
STRATEGIES = ["ft", "tad:alpha=1"]
KEYS = ["ft", "tad(alpha=1.0,beta=0.0)"]  # their canonical run keys
NO_DB = "postgresql+psycopg://nobody:wrong@127.0.0.1:1/nothing"  # a client in API mode must never touch it


@pytest.fixture
def api(service: dict) -> Iterator[dict[str, Any]]:
    """The service fixture plus a running API server and three users: alice and bob (submit tokens) and root
    (admin token), made with the store functions `tad users` / `tad tokens` call (the CLI itself is tested in
    test_missing_wrong_and_revoked_tokens_are_401)."""
    env = {**service["env"], "TAD_MAX_DATASET_BYTES": str(UPLOAD_LIMIT)}
    tokens = {}
    with session_scope(service["settings"]) as s:
        for name, admin in (("alice", False), ("bob", False), ("root", True)):
            users.add_user(s, name, is_admin=admin)
            tokens[name] = users.create_token(s, name, "admin" if admin else "submit").secret
    server = ApiServer(env, service["tmp"])
    try:
        yield {**service, "env": env, "server": server, "url": server.url, "tokens": tokens}
    finally:
        server.stop()


def _client(api: dict, who: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api['tokens'][who]}"} if who else {}
    return httpx.Client(base_url=api["url"], headers=headers, timeout=60)


def _options(api: dict, **extra: Any) -> dict[str, Any]:
    return {"base": str(api["model"]), "adapter": str(api["lora"]), "strategies": STRATEGIES,
            "config": {"batch_size": 2}, "shard_size": 4, **extra}


def _upload(client: httpx.Client, path: Path, options: dict[str, Any]) -> httpx.Response:
    with open(path, "rb") as f:
        return client.post("/jobs/upload", files={"file": (path.name, f, "application/x-ndjson")},
                           data={"options": json.dumps(options)})


def _counts(settings: Any) -> tuple[int, int]:
    """(jobs, datasets) stored."""
    engine = create_engine(settings.database_url)
    with engine.connect() as c:
        counts = (c.execute(text("SELECT count(*) FROM jobs")).scalar(),
                  c.execute(text("SELECT count(*) FROM datasets")).scalar())
    engine.dispose()
    return counts


def _assert_every_row(settings: Any, job_id: int, n: int) -> None:
    with session_scope(settings) as s:
        runs = store.job_runs(s, job_id)
        assert len(runs) == len(STRATEGIES)
        for r in runs:
            assert [x["sample_index"] for x in store.sample_rows(s, r.id)] == list(range(n)), r.key


def _events_until_end(client: httpx.Client, job_id: int, timeout: float = 180) -> list[tuple[str, dict]]:
    """Read the job's server-sent events until the `end` event."""
    events, name = [], ""
    with client.stream("GET", f"/jobs/{job_id}/events", params={"interval": 0.5, "timeout": timeout},
                       timeout=timeout + 30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
                if name in ("end", "timeout"):
                    break
    return events


def test_user_submits_through_the_api_a_worker_runs_it_and_results_stream(api: dict) -> None:
    n = 12
    api["start_worker"]("w1")
    data = write_mc_dataset(api["tmp"] / "colours.jsonl", n)
    with _client(api, "alice") as alice, _client(api, "bob") as bob:
        resp = _upload(alice, data, _options(api))
        assert resp.status_code == 201, resp.text
        job = resp.json()
        assert job["owner"] == "alice" and job["submitted_by"] == "alice" and job["shards_queued"] == 3

        listed = {j["id"]: j for j in bob.get("/jobs").json()}
        assert listed[job["id"]]["owner"] == "alice"  # every user sees who owns each job
        refused = bob.post(f"/jobs/{job['id']}/cancel")
        assert refused.status_code == 403 and "owner" in refused.json()["detail"]
        assert bob.post(f"/jobs/{job['id']}/requeue").status_code == 403

        events = _events_until_end(alice, job["id"])
        assert events[-1][0] == "end" and events[-1][1]["status"] == "done", events[-3:]
        assert all(name == "progress" for name, _ in events[:-1])
        _assert_every_row(api["settings"], job["id"], n)

        status = alice.get(f"/jobs/{job['id']}").json()
        assert (status["status"], status["samples_done"], status["progress"]) == ("done", n, 1.0)
        board = alice.get(f"/jobs/{job['id']}/results").json()["leaderboard"]
        assert sorted(r["key"] for r in board) == sorted(KEYS) and all(r["n"] == n for r in board)

        lines = alice.get(f"/jobs/{job['id']}/samples", params={"format": "jsonl", "page_size": 5}).text.splitlines()
        rows = [json.loads(x) for x in lines]
        assert len(rows) == n * len(STRATEGIES)
        assert sorted((r["strategy"], r["sample_index"]) for r in rows) == sorted(
            (k, i) for k in KEYS for i in range(n))
        assert all(r["gold"] == r["sample_index"] % 2 for r in rows)  # write_mc_dataset's answers, paged
        assert all(x == "-inf" or isinstance(x, float) for r in rows for x in r["scores"])
        got = alice.get(f"/jobs/{job['id']}/samples", params={"format": "csv", "page_size": 7})
        assert got.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(got.text)))
        assert len(table) == n * len(STRATEGIES) and {r["sample_id"] for r in table} == {f"q{i}" for i in range(n)}
        assert all(r["gold"] == str(int(r["sample_index"]) % 2) for r in table)

        # cancelling a finished job changes nothing, and its owner may ask
        assert alice.post(f"/jobs/{job['id']}/cancel").json()["status"] == "done"


def test_cli_server_mode_needs_no_database(api: dict) -> None:
    n = 8
    api["start_worker"]("w1")
    data = write_mc_dataset(api["tmp"] / "cli.jsonl", n)
    env = {**api["env"], "TAD_DATABASE_URL": NO_DB, "TAD_BROKER_URL": "redis://127.0.0.1:1/0",
           "TAD_SERVER_URL": api["url"], "TAD_API_TOKEN": api["tokens"]["alice"]}
    sub = tad(env, "submit", "--dataset", str(data), "--base", str(api["model"]), "--adapter", str(api["lora"]),
              "-s", "ft", "-s", "tad:alpha=1", "--batch-size", "2", "--shard-size", "4")
    assert sub.returncode == 0, sub.stderr
    job_id = int(sub.stdout.strip())
    assert f"job {job_id}: {n} samples x 2 strategies, 2 shards queued" in sub.stderr

    watched = tad(env, "status", str(job_id), "--watch", "--interval", "0.5", timeout=200)
    assert watched.returncode == 0 and f"job {job_id}: done, {n}/{n} samples" in watched.stdout, watched.stderr
    _assert_every_row(api["settings"], job_id, n)

    listed = tad(env, "jobs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {j["id"]: j["submitted_by"] for j in json.loads(listed.stdout)}[job_id] == "alice"
    exported = tad(env, "results", str(job_id), "--csv")
    assert exported.returncode == 0, exported.stderr
    assert len(list(csv.DictReader(io.StringIO(exported.stdout)))) == n * 2
    dumped = tad(env, "results", str(job_id), "--json")
    payload = json.loads(dumped.stdout)
    assert {k: len(v) for k, v in payload["samples"].items()} == {k: n for k in KEYS}
    table = tad(env, "results", str(job_id))
    assert table.returncode == 0 and "tad(alpha=1.0,beta=0.0)" in table.stdout

    # bob may not cancel alice's job: a clear message, exit code 2
    as_bob = tad({**env, "TAD_API_TOKEN": api["tokens"]["bob"]}, "cancel", str(job_id))
    assert as_bob.returncode == 2 and "belongs to another user" in as_bob.stderr
    # a rejected submission lists the problem and stores nothing
    before = _counts(api["settings"])
    bad = tad(env, "submit", "--dataset", str(data), "--base", str(api["model"]), "-s", "nosuch")
    assert bad.returncode == 2 and "unknown strategy 'nosuch'" in bad.stderr and "nothing was stored" in bad.stderr
    assert _counts(api["settings"]) == before
    wrong = tad({**env, "TAD_API_TOKEN": "tad_wrong"}, "jobs")
    assert wrong.returncode == 2 and "API token rejected" in wrong.stderr


def test_only_the_owner_or_an_admin_changes_a_job(api: dict) -> None:
    data = write_mc_dataset(api["tmp"] / "q.jsonl", 6)  # no worker: the jobs stay queued
    with _client(api, "alice") as alice, _client(api, "bob") as bob, _client(api, "root") as root:
        first, second = (_upload(alice, data, _options(api)).json()["id"] for _ in range(2))
        assert bob.post(f"/jobs/{first}/cancel").status_code == 403
        assert alice.get(f"/jobs/{first}").json()["status"] == "queued"
        assert alice.post(f"/jobs/{first}/requeue").json() == {"job_id": first, "shards_sent": 2}
        assert alice.post(f"/jobs/{first}/cancel").json()["status"] == "cancelled"
        assert root.post(f"/jobs/{second}/cancel").json()["status"] == "cancelled"
        assert bob.post("/jobs/999999/cancel").status_code == 404
        # promoting needs an admin token
        assert alice.post("/adapters/lora/1/promote").status_code == 403
        promoted = root.post("/adapters/lora/1/promote")
        assert promoted.status_code == 200 and promoted.json()["promoted"] is True
        assert [a["label"] for a in alice.get("/adapters").json()] == ["lora:1"]
        assert alice.get("/suites").json() == []


def test_missing_wrong_and_revoked_tokens_are_401(api: dict) -> None:
    made = tad(api["env"], "users", "add", "carol")
    assert made.returncode == 0, made.stderr
    assert tad(api["env"], "users", "add", "carol").returncode == 2  # names are unique
    refused = tad(api["env"], "tokens", "create", "carol", "--scope", "admin")
    assert refused.returncode == 2 and "not an admin" in refused.stderr
    created = tad(api["env"], "tokens", "create", "carol", "--scope", "submit")
    assert created.returncode == 0, created.stderr
    carol = created.stdout.strip()  # printed once, alone on stdout
    assert carol.startswith("tad_") and len(carol) > 40
    with httpx.Client(base_url=api["url"], timeout=30) as anon:
        assert anon.get("/jobs", headers={"Authorization": f"Bearer {carol}"}).status_code == 200
        for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/1"), ("POST", "/jobs/1/cancel"),
                             ("GET", "/jobs/1/samples"), ("GET", "/adapters"), ("GET", "/suites")):
            assert anon.request(method, path).status_code == 401, path
        assert anon.get("/jobs", headers={"Authorization": "Bearer tad_not-a-token"}).status_code == 401
        assert anon.get("/jobs", headers={"Authorization": f"Basic {api['tokens']['alice']}"}).status_code == 401
        good = {"Authorization": f"Bearer {api['tokens']['bob']}"}
        assert anon.get("/jobs", headers=good).status_code == 200
        listed = tad(api["env"], "tokens", "list", "--json")
        bob_token = next(t for t in json.loads(listed.stdout) if t["user"] == "bob")
        assert bob_token["last_used_at"] is not None and bob_token["revoked_at"] is None
        revoked = tad(api["env"], "tokens", "revoke", str(bob_token["id"]))
        assert revoked.returncode == 0, revoked.stderr
        resp = anon.get("/jobs", headers=good)
        assert resp.status_code == 401 and "revoked" in resp.json()["detail"]
    assert api["tokens"]["bob"] not in listed.stdout and carol not in listed.stdout  # never a secret


def test_oversized_or_invalid_uploads_store_nothing(api: dict) -> None:
    big = write_mc_dataset(api["tmp"] / "big.jsonl", 400)
    assert big.stat().st_size > UPLOAD_LIMIT
    bad = api["tmp"] / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "choices": ["x", "y"], "answer": 0}\n{"id": "b", "prompt": "p"}\n')
    small = write_mc_dataset(api["tmp"] / "small.jsonl", 3)
    with _client(api, "alice") as alice:
        resp = _upload(alice, big, _options(api))
        assert resp.status_code == 413 and str(UPLOAD_LIMIT) in resp.json()["detail"]
        resp = _upload(alice, bad, _options(api))
        assert resp.status_code == 422 and any("line 2" in e for e in resp.json()["errors"]), resp.text
        assert "tad-upload" not in resp.text  # errors name the uploaded file, not the server's copy
        resp = _upload(alice, small, _options(api, strategies=["tad:alpha=oops"]))
        assert resp.status_code == 422 and "tad:alpha=oops" in resp.text
        resp = _upload(alice, small, {**_options(api), "colour": "red"})
        assert resp.status_code == 422 and "colour" in resp.text
        resp = alice.post("/jobs", json={"dataset": str(small), **_options(api)})
        assert resp.status_code == 422 and "not a registered dataset" in resp.text  # no server paths
        resp = alice.post("/jobs", json={"dataset": "boolq", "limit": 0})
        assert resp.status_code == 422 and "limit" in resp.text
        for config, message in (({"delimiter": 5}, "delimiter must be a string"),  # was a 500 (TypeError)
                                ({"kv_topk": -5}, "kv_topk must be an integer"), ({"stop": "abc"}, "stop must be"),
                                ({"seed": "abc"}, "seed must be")):
            resp = _upload(alice, small, _options(api, config=config))
            assert resp.status_code == 422 and message in resp.text, (config, resp.text)
    assert _counts(api["settings"]) == (0, 0)


def test_fuzzed_requests_never_get_a_server_error(api: dict) -> None:
    """schemathesis generates requests from the served OpenAPI schema, valid ones and ones that break it
    (authenticated as an admin, so they reach the handlers); none may be answered 5xx. Bounded: 10 examples
    per operation and mode."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{api['url']}/openapi.json")
    headers = {"Authorization": f"Bearer {api['tokens']['root']}"}
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {"/jobs", "/jobs/upload", "/jobs/{job_id}/samples"} <= {op.path for op in operations}
    started = time.monotonic()
    for op in operations:
        if op.path.endswith("/events"):  # a stream that lasts until the job ends: tested above
            continue

        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=10, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                resp = case.call(headers=headers, timeout=30)
                if resp.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} -> {resp.status_code}: {resp.text[:300]}")

            try:
                check()
            except Unsatisfiable:  # nothing to break (GET /health takes no input)
                assert mode == schemathesis.GenerationMode.NEGATIVE and op.path == "/health"
    assert not failures, "\n".join(failures[:10]) + "\n" + api["server"].tail()
    assert time.monotonic() - started < 120


def test_fifty_concurrent_submissions_and_polls(api: dict) -> None:
    """A bounded load loop on loopback: 50 threads submit at once and poll their job; every request is answered
    201/200 or refused cleanly (409/503), no job is stored twice, and the p95 latency is printed."""
    from concurrent.futures import ThreadPoolExecutor

    data = write_mc_dataset(api["tmp"] / "load.jsonl", 8)
    latencies: dict[str, list[float]] = {"submit": [], "status": []}
    codes: list[int] = []

    def one(_: int) -> int | None:
        with _client(api, "alice") as client:
            t = time.perf_counter()
            resp = _upload(client, data, _options(api))
            latencies["submit"].append(time.perf_counter() - t)
            codes.append(resp.status_code)
            if resp.status_code != 201:
                return None
            job_id = resp.json()["id"]
            for _ in range(3):
                t = time.perf_counter()
                polled = client.get(f"/jobs/{job_id}")
                latencies["status"].append(time.perf_counter() - t)
                codes.append(polled.status_code)
            return job_id

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=50) as pool:
        ids = [i for i in pool.map(one, range(50)) if i is not None]
    wall = time.perf_counter() - started
    assert set(codes) <= {200, 201, 409, 503}, codes
    assert len(ids) == len(set(ids)) == codes.count(201) and len(ids) >= 45
    jobs, datasets = _counts(api["settings"])
    assert (jobs, datasets) == (len(ids), 1)  # one dataset row however many raced to register it
    with session_scope(api["settings"]) as s:
        assert all(len(store.job_shards(s, i)) == 2 for i in ids)

    def p95(xs: list[float]) -> float:
        return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]

    print(f"\nHTTP API load: {len(ids)}/50 submissions accepted in {wall:.1f} s; p95 submit "
          f"{p95(latencies['submit']) * 1000:.0f} ms, p95 status {p95(latencies['status']) * 1000:.0f} ms "
          f"({len(latencies['status'])} polls)")
