"""Gates that evaluate new adapter versions themselves: registering a version with `--gate SUITE` (or into a
family that names default gate suites) queues `tad regress` for it on the workers, and its verdict is stored.

The path of a gate, all through the functions `tad regress` uses (services.regress):
- `queue_gates` (at registration, in the CLI or the API) checks that each suite is registered and that the family
  has a promoted baseline other than the candidate, stores one `queued` gate per suite and sends a `tad.run_gate`
  message for each; a gate that cannot run is refused before anything is stored.
- `start_gate` (the `tad.run_gate` task, on a worker) plans the gate (`plan_gate`: stored runs reused, missing
  jobs planned), records the jobs on the gate and queues their shards. It never waits for them: a worker that
  waited for shards could be the one worker that has to run them.
- `advance_gate` (called by the worker that finishes a gate's last job, and by every worker's periodic sweep, so
  a lost call costs a sweep interval) plans the gate again, which now finds every run stored, and `finish_gate`
  compares the runs and stores the check; the gate becomes `passed` or `regressed`, or `error` with the reason
  when a job did not end done.
Each status change is a conditional UPDATE, so of several workers racing on one gate exactly one moves it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session

from services.db import store
from services.db.session import session_scope
from services.queueing import QueueUnavailable, enqueue_all_or_fail, send_gate
from services.refs import RefError, parse_ref
from services.regress import GateError, GatePlan, finish_gate, plan_gate
from services.security import SecurityError
from services.settings import Settings, get_settings
from services.submit_request import SubmissionError

log = logging.getLogger(__name__)


def _server_token(settings: Settings) -> str | None:
    """The deployment's submit token: the workers hold it, so a gate's jobs pass the same check as any job."""
    return settings.submit_token.get_secret_value() if settings.submit_token else None


def resolve_gate_suites(s: Session, family: str, candidate_sha256: str | None,
                        suites: Sequence[str]) -> list[store.SuiteInfo]:
    """The registered suites named by `suites` (NAME or NAME:VERSION, newest when no version), after checking that
    `family` has a promoted baseline to compare with that is not these very weights; GateError otherwise."""
    baseline = store.promoted_adapter(s, family)
    if baseline is None:
        raise GateError(f"adapter {family} has no promoted version to gate against: promote one first "
                        f"(tad adapters promote {family}:VERSION)")
    if candidate_sha256 is not None and baseline.sha256 == candidate_sha256:
        raise GateError(f"these weights are the promoted baseline {baseline.label} itself: nothing to gate")
    found = []
    for text in suites:
        try:
            name, version = parse_ref(text, "gate suite")
        except RefError as e:
            raise GateError(str(e)) from None
        suite = store.find_suite(s, name, version)
        if suite is None:
            raise GateError(f"gate suite {text!r} is not registered (tad suites add FILE; tad suites list)")
        found.append(suite)
    return found


def queue_gates(candidate: store.AdapterInfo, suites: Sequence[store.SuiteInfo], *, alpha: float = 0.05,
                min_effect: float = 0.01, submitted_by: str = "",
                settings: Settings | None = None) -> list[store.GateRunInfo]:
    """Store one queued gate per suite for adapter version `candidate` and send them to the workers. A gate whose
    message cannot be sent is marked `error` and the broker's exception propagates."""
    settings = settings or get_settings()
    if not 0 < alpha <= 1 or not 0 <= min_effect < 1:
        raise GateError(f"alpha must be in (0, 1] and min_effect in [0, 1), got {alpha} and {min_effect}")
    with session_scope(settings) as s:
        baseline = store.promoted_adapter(s, candidate.name)  # pinned: a later promotion does not move it
        gates = [store.create_gate_run(s, candidate_id=candidate.id, suite_id=suite.id, alpha=alpha,
                                       min_effect=min_effect, submitted_by=submitted_by,
                                       baseline_id=None if baseline is None else baseline.id) for suite in suites]
    for gate in gates:
        _send_gate(gate.id, settings)
    return gates


def _send_gate(gate_id: int, settings: Settings) -> None:
    try:
        send_gate(gate_id, settings)
    except Exception as e:  # noqa: BLE001 - broker unreachable: the gate must not wait forever
        _fail(gate_id, "queued", f"could not queue the gate: {e}", settings)
        raise


def _fail(gate_id: int, from_status: str, error: str, settings: Settings) -> None:
    with session_scope(settings) as s:
        store.move_gate_run(s, gate_id, from_status, "error", error=error[:2000])
    log.warning("gate %s: %s", gate_id, error)


class _GateMoved(Exception):
    """The gate left the status this worker planned it from (another worker got there first)."""


def _plan(gate: store.GateRunInfo, settings: Settings, status: str) -> GatePlan:
    """Plan the gate's missing jobs; their ids are recorded (and the gate moved from `status` to `running`) in
    the jobs' own transaction, so a crash never leaves jobs the gate does not know of."""
    def record(s: Session, jobs: dict[int, int]) -> None:
        if not jobs and status == "finishing":
            return  # nothing to compute: the gate stays `finishing` and gets its verdict now
        if not store.move_gate_run(s, gate.id, status, "running", job_ids=list(jobs)):
            raise _GateMoved(gate.id)  # rolls the jobs back: another worker plans (or planned) this gate

    return plan_gate(gate.candidate, gate.suite, gate.baseline, alpha=gate.alpha, min_effect=gate.min_effect,
                     submitted_by=gate.submitted_by or f"gate {gate.id}", token=_server_token(settings),
                     settings=settings, record=record)


def start_gate(gate_id: int, settings: Settings | None = None) -> store.GateRunInfo:
    """Plan a queued gate and queue its jobs (the `tad.run_gate` task); a gate with nothing to compute gets its
    verdict at once."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        gate = store.get_gate_run(s, gate_id)
        if not store.move_gate_run(s, gate_id, "queued", "running"):
            return gate  # a duplicate delivery: another worker took it
    _run_plan(gate, settings, "running")
    return advance_gate(gate_id, settings)


def _run_plan(gate: store.GateRunInfo, settings: Settings, status: str) -> None:
    """Plan the gate; record its jobs (with them, before they are queued, so a job cannot end unnoticed) and
    queue them."""
    try:
        plan = _plan(gate, settings, status)
    except _GateMoved:
        return
    except (GateError, SubmissionError, SecurityError) as e:
        _fail(gate.id, status, f"the gate cannot run: {e}", settings)
        return
    _queue(gate, plan, settings)


def _queue(gate: store.GateRunInfo, plan: GatePlan, settings: Settings) -> None:
    try:
        enqueue_all_or_fail(list(plan.jobs), settings)
    except QueueUnavailable as e:
        _fail(gate.id, "running", f"could not queue the gate's jobs: {e.cause}", settings)


def advance_gate(gate_id: int, settings: Settings | None = None) -> store.GateRunInfo:
    """When every job of a running gate has ended: compare the runs and store the verdict (or the reason there is
    none). Does nothing while a job still runs, or when another worker is finishing the gate."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        gate = store.get_gate_run(s, gate_id)
        if gate.status != "running":
            return gate
        jobs = [store.get_job(s, j) for j in gate.job_ids]
        if not all(j.finished for j in jobs) or not store.move_gate_run(s, gate_id, "running", "finishing"):
            return gate
    bad = [j for j in jobs if j.status != "done"]
    if bad:
        _fail(gate_id, "finishing", "; ".join(f"job {j.id} ended {j.status}" + (f": {j.error}" if j.error else "")
                                              for j in bad), settings)
    else:
        try:
            plan = _plan(gate, settings, "finishing")
            if plan.jobs:  # a run it needs is missing (its planning was interrupted, or another job's reuse went
                _queue(gate, plan, settings)  # away): stored with the gate `running` on them again; compute first
            else:
                result = finish_gate(plan, settings)
                if result.verdict == "no verdict":
                    _fail(gate_id, "finishing", f"no verdict: {result.why_undecided}", settings)
                else:
                    with session_scope(settings) as s:
                        store.move_gate_run(s, gate_id, "finishing", result.verdict, check_id=result.check_id)
        except _GateMoved:
            pass  # not ours any more
        except Exception as e:  # noqa: BLE001 - recorded on the gate: a gate never stays `finishing`
            _fail(gate_id, "finishing", f"{type(e).__name__}: {e}", settings)
    with session_scope(settings) as s:
        return store.get_gate_run(s, gate_id)


def on_job_finished(job_id: int, settings: Settings | None = None) -> None:
    """A job ended: advance the running gates waiting for it."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        waiting = [g.id for g in store.gate_runs(s, open_only=True) if g.status == "running" and job_id in g.job_ids]
    for gate_id in waiting:
        advance_gate(gate_id, settings)


def advance_open_gates(settings: Settings | None = None) -> list[int]:
    """Advance every running gate whose jobs have all ended (the periodic sweep); returns the gates it finished."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        running = [g.id for g in store.gate_runs(s, open_only=True) if g.status == "running"]
    return [g for g in running if advance_gate(g, settings).finished]


def newest_per_suite(gates: Sequence[store.GateRunInfo]) -> dict[int, list[store.GateRunInfo]]:
    """Adapter version id -> its newest gate on each suite (what `tad adapters list` and the dashboard show)."""
    out: dict[int, list[store.GateRunInfo]] = {}
    for g in sorted(gates, key=lambda g: -g.id):
        if all(x.suite != g.suite for x in out.get(g.candidate_id, [])):
            out.setdefault(g.candidate_id, []).append(g)
    return out


def gate_exit_code(gates: Sequence[store.GateRunInfo]) -> int:
    """The CI exit code of a set of gates: 1 when one regressed, 2 when one has no verdict (an error, or still
    running at the timeout), else 0."""
    if any(g.status == "regressed" for g in gates):
        return 1
    return 0 if all(g.status == "passed" for g in gates) else 2


def wait_for_gates(gate_ids: Sequence[int], settings: Settings | None = None, *, timeout: float | None = None,
                   poll: float = 1.0,
                   fetch: Callable[[int], store.GateRunInfo] | None = None) -> list[store.GateRunInfo]:
    """Poll until every gate has an outcome (or `timeout` seconds pass: the unfinished ones are returned as they
    are); the CI recipe's `--wait`. `fetch` reads one gate (default: from the database; the CLI's API mode reads
    GET /gates/{id})."""
    if fetch is None:
        settings = settings or get_settings()

        def fetch(gate_id: int) -> store.GateRunInfo:
            with session_scope(settings) as s:
                return store.get_gate_run(s, gate_id)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        gates = [fetch(g) for g in gate_ids]
        if all(g.finished for g in gates) or (deadline is not None and time.monotonic() > deadline):
            return gates
        time.sleep(poll)
