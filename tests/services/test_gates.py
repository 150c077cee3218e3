"""New adapter versions evaluate themselves: `tad adapters register NAME DIR --gate SUITE` queues the regression
gate, the workers run it and its verdict is stored and listed.

The gate's verdict is checked against `tad regress` on the same runs (the same rule, services.regress.verdict),
and the check it stores is the one `tad adapters list` and the dashboard show.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from services.db import store, users
from services.db.session import session_scope
from services.gates import advance_gate, gate_exit_code, start_gate
from services.shard_runner import run_job_embedded
from tests.conftest import build_adapter
from tests.services.helpers import ApiServer, tad_cli, write_mc_dataset
from tests.services.test_regress import SUITE, _gate, _ok, _use_env


@pytest.fixture(scope="module")
def third_lora(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build_adapter(tiny_model_dir, tmp_path_factory.mktemp("tiny_lora3") / "lora3", "lora", seed=3)


def _family(tmp: Path, model: str, first: Path) -> None:
    """fam:1 registered and promoted, suite smoke:1 stored."""
    write_mc_dataset(tmp / "mc.jsonl", 24)
    (tmp / "suite.yaml").write_text(SUITE)
    _ok(["adapters", "register", "fam", str(first), "--base", model])
    _ok(["adapters", "promote", "fam:1"])
    _ok(["suites", "add", str(tmp / "suite.yaml")])


def _sqlite_family(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server: Any, model: Path, first: Path,
                   extra: Path) -> Any:
    """The CLI on an SQLite DB and the private Redis, with `_family` stored; returns its Settings."""
    settings = _use_env(monkeypatch, f"sqlite:///{tmp_path / 'g.db'}", [model.parent.parent, tmp_path, extra.parent],
                        TAD_BROKER_URL=redis_server.url, TAD_QUEUE="tadtest-gates")
    _family(tmp_path, str(model), first)
    return settings


def _service_family(service: dict, monkeypatch: pytest.MonkeyPatch, first: Path, extra_root: Path) -> Any:
    """The CLI pointed at the service fixture's Postgres and Redis, with `_family` stored; returns its Settings."""
    env = service["env"]
    settings = _use_env(monkeypatch, env["TAD_DATABASE_URL"], [service["model"].parent.parent, service["tmp"],
                                                               extra_root.parent],
                        TAD_BROKER_URL=env["TAD_BROKER_URL"], TAD_QUEUE=env["TAD_QUEUE"])
    _family(service["tmp"], str(service["model"]), first)
    return settings


def test_a_gate_that_cannot_run_is_refused_before_the_version_is_stored(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model_dir: Path, tiny_lora_dir: Path,
        third_lora: Path) -> None:
    _use_env(monkeypatch, f"sqlite:///{tmp_path / 'g.db'}", [tiny_model_dir.parent.parent, tmp_path,
                                                              third_lora.parent])
    model = str(tiny_model_dir)
    write_mc_dataset(tmp_path / "mc.jsonl", 24)
    (tmp_path / "suite.yaml").write_text(SUITE)
    _ok(["suites", "add", str(tmp_path / "suite.yaml")])
    out = _ok(["adapters", "register", "fam", str(tiny_lora_dir), "--base", model, "--gate", "smoke"], 2)
    assert "has no promoted version to gate against" in out
    assert json.loads(_ok(["adapters", "list", "--json"])) == []  # nothing stored
    _ok(["adapters", "register", "fam", str(tiny_lora_dir), "--base", model])
    _ok(["adapters", "promote", "fam:1"])
    out = _ok(["adapters", "register", "fam", str(third_lora), "--base", model, "--gate", "nosuch"], 2)
    assert "gate suite 'nosuch' is not registered" in out
    assert "gate suite 'smoke:x'" in _ok(["adapters", "register", "fam", str(third_lora), "--base", model,
                                          "--gate", "smoke:x"], 2)
    assert [f"{a['name']}:{a['version']}" for a in json.loads(_ok(["adapters", "list", "--json"]))] == ["fam:1"]
    assert "gate suite 'nosuch' is not registered" in _ok(["adapters", "gates", "fam", "nosuch"], 2)
    assert "gated on smoke" in _ok(["adapters", "gates", "fam", "smoke"])
    assert "gated on smoke" in _ok(["adapters", "gates", "fam"])
    # the family's default gate cannot compare the baseline's own weights: registered, gate skipped with a note
    copy = tmp_path / "copy_of_1"
    shutil.copytree(tiny_lora_dir, copy)
    out = _ok(["adapters", "register", "fam", str(copy), "--base", model, "--version", "2"])
    assert "registered fam:2" in out and "default gates of fam not queued: these weights are the promoted " \
        "baseline fam:1" in out and "\ngate " not in out
    assert "gated on no suite" in _ok(["adapters", "gates", "fam", "--clear"])


def test_gate_lifecycle_reaches_the_regress_verdict_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server, tiny_model_dir: Path,
        tiny_lora_dir: Path, third_lora: Path) -> None:
    """The worker's path without a worker: the gate is queued (private Redis), `start_gate` plans and queues its
    jobs, the jobs run through the shard function, and `advance_gate` stores the verdict `tad regress` gives;
    advancing again (a racing worker, the sweep) stores nothing more."""
    settings = _sqlite_family(monkeypatch, tmp_path, redis_server, tiny_model_dir, tiny_lora_dir, third_lora)
    out = _ok(["adapters", "register", "fam", str(third_lora), "--base", str(tiny_model_dir), "--gate", "smoke"])
    assert "registered fam:2" in out and "on suite smoke:1: queued" in out
    with session_scope(settings) as s:
        (gate,) = store.gate_runs(s, adapter_name="fam")
    assert gate.status == "queued" and gate.candidate == "fam:2" and gate.verdict is None

    gate = start_gate(gate.id, settings)
    assert gate.status == "running" and len(gate.job_ids) == 4  # 2 datasets x (baseline, candidate)
    assert start_gate(gate.id, settings).job_ids == gate.job_ids  # a duplicate delivery plans nothing
    for job_id in gate.job_ids[:-1]:
        run_job_embedded(job_id, settings)
        assert advance_gate(gate.id, settings).status == "running"  # a job still to run
    run_job_embedded(gate.job_ids[-1], settings)
    done = advance_gate(gate.id, settings)
    assert done.status in ("passed", "regressed") and done.check_id is not None and done.finished
    assert advance_gate(gate.id, settings) == done
    with session_scope(settings) as s:
        checks = store.regression_checks(s, "fam")
    assert [c.id for c in checks] == [done.check_id] and checks[0].verdict == done.status
    code, payload = _gate(["fam:2", "--suite", "smoke"])  # the same runs, reused
    assert payload["jobs_run"] == [] and payload["verdict"] == done.status and code == gate_exit_code([done])
    assert [r["verdict"] for r in payload["rows"]] == [r["verdict"] for r in checks[0].rows]
    listed = {a["version"]: a["gates"] for a in json.loads(_ok(["adapters", "list", "--json"]))}
    assert listed[1] == [] and [(g["suite"], g["verdict"], g["check_id"]) for g in listed[2]] == [
        ("smoke:1", done.status, done.check_id)]
    assert f"smoke:1 {done.status}" in _ok(["adapters", "list"])


def test_a_worker_gate_without_a_verdict_ends_in_error_naming_the_rows(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server, tiny_model_dir: Path,
        tiny_lora_dir: Path, third_lora: Path) -> None:
    """On the workers too, a gate whose suite cannot reach alpha (4 samples) has no verdict: status `error` with
    the reason, no check stored, exit code 2 for `--wait`; it used to pass."""
    settings = _sqlite_family(monkeypatch, tmp_path, redis_server, tiny_model_dir, tiny_lora_dir, third_lora)
    (tmp_path / "tiny.yaml").write_text("name: tiny\nversion: 1\ndatasets:\n  - {dataset: mc.jsonl, split: val, "
                                        "limit: 4}\nstrategies: [ft]\n")
    _ok(["suites", "add", str(tmp_path / "tiny.yaml")])
    _ok(["adapters", "register", "fam", str(third_lora), "--base", str(tiny_model_dir), "--gate", "tiny"])
    with session_scope(settings) as s:
        (gate,) = store.gate_runs(s, adapter_name="fam")
    gate = start_gate(gate.id, settings)
    for job_id in gate.job_ids:
        run_job_embedded(job_id, settings)
    done = advance_gate(gate.id, settings)
    assert done.status == "error" and done.check_id is None and gate_exit_code([done]) == 2
    assert "no verdict: mc:val / ft: 4 paired samples, too few for any outcome to reach alpha 0.05" in done.error
    with session_scope(settings) as s:
        assert store.regression_checks(s, "fam") == []


def test_a_gate_keeps_the_baseline_promoted_when_it_was_queued(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server, tiny_model_dir: Path,
        tiny_lora_dir: Path, third_lora: Path) -> None:
    """fam:2 is gated against fam:1, promoted when the gate was queued; promoting fam:2 itself before a worker
    takes the gate used to make the gate compare fam:2 with itself (an error), or with whatever was promoted by
    then. The gate now records its baseline and plans, compares and stores the check against it."""
    settings = _sqlite_family(monkeypatch, tmp_path, redis_server, tiny_model_dir, tiny_lora_dir, third_lora)
    _ok(["adapters", "register", "fam", str(third_lora), "--base", str(tiny_model_dir), "--gate", "smoke"])
    with session_scope(settings) as s:
        (gate,) = store.gate_runs(s, adapter_name="fam")
    assert gate.baseline == "fam:1"
    _ok(["adapters", "promote", "fam:2"])
    gate = start_gate(gate.id, settings)
    assert gate.status == "running", gate.error
    for job_id in gate.job_ids:
        run_job_embedded(job_id, settings)
    done = advance_gate(gate.id, settings)
    assert done.status in ("passed", "regressed"), done.error
    with session_scope(settings) as s:
        (check,) = store.regression_checks(s, "fam")
    assert (check.candidate, check.baseline) == ("fam:2", "fam:1")


def test_a_gate_interrupted_while_planning_is_planned_once_by_the_sweep(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server, tiny_model_dir: Path,
        tiny_lora_dir: Path, third_lora: Path) -> None:
    """The worker that took the gate died while planning. Its jobs were committed one by one and the gate's job
    ids after them: a crash between left jobs nobody referred to, and the sweep then planned every job a second
    time. Now a gate's jobs and its job ids commit together: here a failure at the record rolls the jobs back,
    the gate is `running` with no jobs, and the sweep plans each job once and reaches the verdict."""
    from services.gates import advance_open_gates
    from services.regress import plan_gate

    settings = _sqlite_family(monkeypatch, tmp_path, redis_server, tiny_model_dir, tiny_lora_dir, third_lora)
    _ok(["adapters", "register", "fam", str(third_lora), "--base", str(tiny_model_dir), "--gate", "smoke"])
    with session_scope(settings) as s:
        (gate,) = store.gate_runs(s, adapter_name="fam")
        store.move_gate_run(s, gate.id, "queued", "running")  # start_gate's first step, then the worker died

    def crash(_s: object, jobs: dict[int, int]) -> None:
        assert len(jobs) == 4
        raise KeyboardInterrupt("the worker died here")

    with pytest.raises(KeyboardInterrupt):
        plan_gate("fam:2", "smoke", settings=settings, record=crash)
    with session_scope(settings) as s:
        assert store.list_jobs(s) == [] and store.get_gate_run(s, gate.id).job_ids == []  # nothing half-stored

    advance_open_gates(settings)  # the periodic sweep: a running gate with no jobs is planned from scratch
    with session_scope(settings) as s:
        planned = store.get_gate_run(s, gate.id)
        jobs = store.list_jobs(s)
    assert planned.status == "running" and sorted(planned.job_ids) == sorted(j.id for j in jobs) and len(jobs) == 4
    advance_open_gates(settings)  # again, while the jobs run: nothing more is planned
    for job_id in planned.job_ids:
        run_job_embedded(job_id, settings)
    done = advance_gate(gate.id, settings)
    assert done.status in ("passed", "regressed") and done.check_id is not None
    with session_scope(settings) as s:
        assert len(store.list_jobs(s)) == 4


def test_a_gate_whose_job_fails_ends_in_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server,
                                              tiny_model_dir: Path, tiny_lora_dir: Path, third_lora: Path) -> None:
    settings = _sqlite_family(monkeypatch, tmp_path, redis_server, tiny_model_dir, tiny_lora_dir, third_lora)
    _ok(["adapters", "register", "fam", str(third_lora), "--base", str(tiny_model_dir), "--gate", "smoke"])
    with session_scope(settings) as s:
        (gate,) = store.gate_runs(s)
    gate = start_gate(gate.id, settings)
    with session_scope(settings) as s:
        for job_id in gate.job_ids:
            store.mark_job_failed(s, job_id, "the model no longer loads")
    failed = advance_gate(gate.id, settings)
    assert failed.status == "error" and "ended failed: the model no longer loads" in failed.error
    assert failed.verdict is None and gate_exit_code([failed]) == 2
    with session_scope(settings) as s:
        assert store.regression_checks(s, "fam") == []


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_register_with_gate_runs_on_a_celery_worker_and_ci_waits(service: dict, monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_lora_dir: Path, third_lora: Path) -> None:
    """The CI recipe: register with --gate --wait against a real `tad worker` (Celery, Redis, Postgres): the
    exit code is the verdict's, the verdict is stored with its check, and a family's default gate runs for the
    next version without --gate."""
    env, tmp, model = service["env"], service["tmp"], str(service["model"])
    settings = _service_family(service, monkeypatch, tiny_lora_dir, third_lora)
    worker = service["start_worker"]("gates")
    r = CliRunner().invoke(app, ["adapters", "register", "fam", str(third_lora), "--base", model, "--gate", "smoke",
                                 "--wait", "--timeout", "400"])
    assert r.exit_code in (0, 1), (r.output, worker.tail())
    with session_scope(settings) as s:
        (gate,) = store.gate_runs(s, adapter_name="fam")
        (check,) = store.regression_checks(s, "fam")
        ran_by = {sh.worker for j in gate.job_ids for sh in store.job_shards(s, j)}
    assert gate.status == check.verdict == ("regressed" if r.exit_code == 1 else "passed"), r.output
    assert gate.check_id == check.id and f"gate {gate.id}: fam:2 on suite smoke:1: {gate.status}" in r.output
    assert ran_by and all(w for w in ran_by)

    # The next version through the API (`tad serve`), as a CI job without database or broker credentials would:
    # no --gate, so the family's default gate runs; --wait polls GET /gates/{id}; the exit code is the verdict's.
    _ok(["adapters", "gates", "fam", "smoke"])
    fourth = build_adapter(service["model"], tmp / "lora4", "lora", seed=4)
    with session_scope(settings) as s:
        users.add_user(s, "ci")
        secret = users.create_token(s, "ci").secret
    server = ApiServer({**env, "TAD_MODEL_ROOTS": os.environ["TAD_MODEL_ROOTS"]}, tmp)
    try:
        client_env = {**env, "TAD_DATABASE_URL": "postgresql+psycopg://nobody:wrong@127.0.0.1:1/nothing",
                      "TAD_BROKER_URL": "redis://127.0.0.1:1/0", "TAD_SERVER_URL": server.url,
                      "TAD_API_TOKEN": secret}
        r2 = tad_cli(client_env, "adapters", "register", "fam", str(fourth), "--base", model, "--wait",
                     "--timeout", "400", timeout=500)
        refused = tad_cli(client_env, "adapters", "register", "fam", str(tmp / "nowhere"), "--base", model)
    finally:
        server.stop()
    assert r2.returncode in (0, 1), (r2.stdout, r2.stderr, worker.tail())
    with session_scope(settings) as s:
        newest = store.gate_runs(s, adapter_name="fam")[0]
    assert newest.candidate == "fam:3" and newest.status in ("passed", "regressed") and newest.check_id
    assert newest.status == ("regressed" if r2.returncode == 1 else "passed") and newest.submitted_by == "ci"
    assert "registered fam:3" in r2.stdout and f"gate {newest.id}: fam:3 on suite smoke:1: queued" in r2.stdout
    assert f"gate {newest.id}: fam:3 on suite smoke:1: {newest.status} (check {newest.check_id})" in r2.stdout
    assert refused.returncode == 2 and "nowhere" in refused.stderr, (refused.stdout, refused.stderr)


def test_api_registers_a_version_with_its_gate_and_reports_the_gate(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server, tiny_model_dir: Path, tiny_lora_dir: Path,
        third_lora: Path) -> None:
    """POST /adapters with a `gate` field: refused with 422 naming the problem (nothing stored) when the suite is
    unknown; else the version is registered and its gate queued, and GET /gates/{id} and GET /adapters show it."""
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.db import users

    settings = _sqlite_family(monkeypatch, tmp_path, redis_server, tiny_model_dir, tiny_lora_dir, third_lora)
    with session_scope(settings) as s:
        users.add_user(s, "ci")
        secret = users.create_token(s, "ci").secret
    body = {"name": "fam", "path": str(third_lora), "base": str(tiny_model_dir), "gate": ["nosuch"]}
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {secret}"}) as api:
        refused = api.post("/adapters", json=body)
        assert refused.status_code == 422 and "gate suite 'nosuch' is not registered" in refused.text
        assert [a["label"] for a in api.get("/adapters").json()] == ["fam:1"]
        assert api.post("/adapters", json={**body, "name": "a:b"}).status_code == 422
        created = api.post("/adapters", json={**body, "gate": ["smoke"]})
        assert created.status_code == 201, created.text
        reply = created.json()
        assert reply["adapter"]["label"] == "fam:2" and reply["created"] is True
        (gate,) = reply["gates"]
        assert (gate["candidate"], gate["suite"], gate["status"], gate["verdict"]) == ("fam:2", "smoke:1", "queued",
                                                                                      None)
        assert api.get(f"/gates/{gate['id']}").json()["status"] == "queued"
        assert api.get("/gates/999").status_code == 404
        listed = {a["label"]: a["gates"] for a in api.get("/adapters").json()}
        assert [g["id"] for g in listed["fam:2"]] == [gate["id"]] and listed["fam:1"] == []
        again = api.post("/adapters", json={**body, "gate": ["smoke"]}).json()  # CI re-run: the same gate
        assert again["created"] is False and [g["id"] for g in again["gates"]] == [gate["id"]]
        # the broker down: the version is stored, its gate marked error, and the answer is 503, not a bare 500
        redis_server.stop()
        fifth = build_adapter(tiny_model_dir, tmp_path / "lora5", "lora", seed=5)
        down = api.post("/adapters", json={**body, "path": str(fifth), "gate": ["smoke"]})
        assert down.status_code == 503 and "broker unavailable" in down.json()["detail"], down.text
        listed = {a["label"]: a["gates"] for a in api.get("/adapters").json()}
        assert [g["status"] for g in listed["fam:3"]] == ["error"]
        assert "could not queue the gate" in listed["fam:3"][0]["error"]


def test_a_queued_gate_whose_message_is_gone_is_sent_again(service: dict, monkeypatch: pytest.MonkeyPatch,
                                                           tiny_lora_dir: Path, third_lora: Path) -> None:
    """A gate stored `queued` whose `tad.run_gate` message never reached the broker (the registering process died,
    the send failed after the commit) is sent again by the orphan check, once, and then runs to a verdict."""
    from services.broker_messages import pending_tasks
    from services.queueing import recover_orphans

    env, tmp, model = service["env"], service["tmp"], str(service["model"])
    settings = _service_family(service, monkeypatch, tiny_lora_dir, third_lora)
    _ok(["adapters", "register", "fam", str(third_lora), "--base", model])  # fam:2, no gate
    with session_scope(settings) as s:
        candidate = store.find_adapter(s, "fam", 2)
        (suite,) = [x for x in store.list_suites(s) if x.name == "smoke"]
        gate = store.create_gate_run(s, candidate_id=candidate.id, suite_id=suite.id, alpha=0.05, min_effect=0.01)
    fast = settings.model_copy(update={"orphan_after": 0.5})
    time.sleep(0.6)
    assert recover_orphans(fast)["gates"] == [gate.id]
    assert ("tad.run_gate", (gate.id,)) in pending_tasks(fast)
    time.sleep(0.6)
    assert recover_orphans(fast)["gates"] == []  # its message is in the queue now
    service["start_worker"]("gates")
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        with session_scope(settings) as s:
            now = store.get_gate_run(s, gate.id)
        if now.finished:
            break
        time.sleep(1)
    assert now.status in ("passed", "regressed") and now.check_id, now


def test_the_orphan_check_reads_gate_times_on_sqlite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_server,
                                                     tiny_model_dir: Path, tiny_lora_dir: Path,
                                                     third_lora: Path) -> None:
    """SQLite returns naive datetimes: the gates' age is compared in SQL, so the check works on the embedded DB
    (comparing in Python raised TypeError there and the sweep skipped the rest of its recovery)."""
    from services.queueing import recover_orphans

    settings = _sqlite_family(monkeypatch, tmp_path, redis_server, tiny_model_dir, tiny_lora_dir, third_lora)
    _ok(["adapters", "register", "fam", str(third_lora), "--base", str(tiny_model_dir)])
    with session_scope(settings) as s:
        candidate = store.find_adapter(s, "fam", 2)
        (suite,) = [x for x in store.list_suites(s) if x.name == "smoke"]
        gate = store.create_gate_run(s, candidate_id=candidate.id, suite_id=suite.id, alpha=0.05, min_effect=0.01)
    time.sleep(0.6)
    assert recover_orphans(settings.model_copy(update={"orphan_after": 0.5})) == {"shards": [], "gates": [gate.id]}
