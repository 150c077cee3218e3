"""Regression gate: a candidate adapter version against a baseline version on a suite, with a CI-usable verdict.

`plan_gate` resolves candidate, baseline (default: the promoted version) and suite, validates one job request per
(adapter, dataset), and for each either REUSES stored runs (every strategy's run hash found in a finished job:
same base model, adapter weights, dataset content, split, limit, strategy spec, generation config and code
version) or plans a new job. The planned jobs run in this process (`run_embedded`) or on the Celery workers
(`run_on_workers`); `finish_gate` then pairs the two adapters' runs sample by sample for every dataset and
strategy, computes the difference with its exact interval and the exact McNemar p-value
(`tad_core.metrics.mcnemar`, `mcnemar_exact_ci`), gives each row a verdict and stores the check (the dashboard shows it).

Verdicts: regressed when diff < -min_effect and p_holm < alpha; improved when diff > min_effect and p_holm < alpha;
unchanged otherwise. `p_holm` is the row's McNemar p adjusted (Holm) over every row of the check: one
uncorrected row out of a suite's datasets x strategies failed the gate by chance alone (at 12 independent rows of
an unchanged adapter, about one gate in five). A row without paired samples (`no data`), or with too few for any
outcome to reach `alpha` (`too few`: n <= 5 at 0.05), or with samples whose evaluation failed on one side only
(`errors`: left out of the pairs, they would hide a candidate that fails on hard samples), has no verdict, and
neither has the gate unless another row regressed: a gate that could not fail does not pass. The row's interval is the exact one that agrees with its raw
McNemar p (tad_core.metrics.mcnemar_exact_ci, level 1 - alpha).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from services.db import store, views
from services.db.session import session_scope
from services.planning import plan_validated, run_hashes
from services.queueing import QueueUnavailable, enqueue_all_or_fail
from services.refs import RefError, parse_ref
from services.settings import Settings, get_settings
from services.shard_runner import run_job_embedded
from services.submission import ValidatedRequest, validate_request
from services.submit_request import SubmitRequest
from services.suites import SuiteDataset, SuiteSpec

class GateError(ValueError):
    """The gate cannot be run as asked (unknown adapter / suite, no baseline, mismatched bases...): usage error."""


class EvaluationFailed(RuntimeError):
    """A job the gate needed did not finish (failed, partial, cancelled or timed out): no verdict."""


NO_VERDICT = ("no data", "too few", "errors")


def verdict(diff: float, p_value: float, alpha: float, min_effect: float) -> str:
    """improved / unchanged / regressed for a paired accuracy difference (candidate - baseline)."""
    if p_value < alpha and diff < -min_effect:
        return "regressed"
    if p_value < alpha and diff > min_effect:
        return "improved"
    return "unchanged"


def can_reach(n: int, alpha: float) -> bool:
    """Whether some outcome of `n` paired samples reaches exact McNemar p < alpha: the most extreme one, every
    sample discordant the same way, has p = 2 * 0.5**n."""
    return n > 0 and 2 * 0.5 ** n < alpha


@dataclass
class _SideRun:
    """The runs of one adapter on one suite dataset: reused from the DB or from a job planned by this gate."""

    adapter: store.AdapterInfo
    dataset: SuiteDataset
    request: ValidatedRequest
    hashes: dict[str, str]  # strategy key -> run hash
    runs: dict[str, store.RunInfo] = field(default_factory=dict)
    job_id: int | None = None  # the job this gate planned for it (None: reused)
    shared_with: _SideRun | None = None  # identical request (same weights) planned earlier in this gate

    @property
    def reused(self) -> bool:
        """Its runs were found in the database (not computed by this gate)."""
        return (self.shared_with or self).job_id is None


@dataclass
class GatePlan:
    candidate: store.AdapterInfo
    baseline: store.AdapterInfo
    suite: store.SuiteInfo
    alpha: float
    min_effect: float
    sides: list[_SideRun]
    jobs: dict[int, int]  # planned job id -> samples to compute

    @property
    def total_samples(self) -> int:
        return sum(self.jobs.values())


@dataclass(frozen=True)
class GateRow:
    dataset: str
    split: str
    limit: int | None
    strategy: str
    n: int
    baseline_acc: float | None
    candidate_acc: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None  # exact McNemar, this row alone
    p_holm: float | None  # p_value adjusted over the check's rows: the verdict reads this
    fixed: int  # baseline wrong, candidate right
    broken: int  # baseline right, candidate wrong
    one_sided_errors: int  # samples whose evaluation failed on one side only (left out of n): no verdict
    verdict: str
    baseline_run_id: int
    candidate_run_id: int
    baseline_reused: bool
    candidate_reused: bool


@dataclass(frozen=True)
class GateResult:
    check_id: int | None  # None: no verdict, nothing stored
    candidate: str
    baseline: str
    suite: str
    alpha: float
    min_effect: float
    rows: list[GateRow]
    jobs_run: list[int]

    @property
    def regressed(self) -> bool:
        return any(r.verdict == "regressed" for r in self.rows)

    @property
    def undecided(self) -> list[GateRow]:
        """The rows without a verdict (no paired samples, or too few to ever reach alpha)."""
        return [r for r in self.rows if r.verdict in NO_VERDICT]

    @property
    def verdict(self) -> str:
        return "regressed" if self.regressed else "no verdict" if self.undecided else "passed"

    @property
    def exit_code(self) -> int:
        return {"regressed": 1, "no verdict": 2, "passed": 0}[self.verdict]

    @property
    def why_undecided(self) -> str:
        return "; ".join(f"{r.dataset}:{r.split} / {r.strategy}: " + (
            "no paired samples" if r.verdict == "no data" else
            f"{r.one_sided_errors} samples failed on one side only (tad results JOB --csv shows the errors)"
            if r.verdict == "errors" else
            f"{r.n} paired samples, too few for any outcome to reach alpha {self.alpha:g}") for r in self.undecided)

    def to_json(self) -> dict[str, Any]:
        return {"check_id": self.check_id, "candidate": self.candidate, "baseline": self.baseline,
                "suite": self.suite, "alpha": self.alpha, "min_effect": self.min_effect,
                "verdict": self.verdict, "exit_code": self.exit_code,
                "jobs_run": self.jobs_run, "rows": [asdict(r) for r in self.rows]}


def _ref(text: str, what: str) -> tuple[str, int | None]:
    try:
        return parse_ref(text, what)
    except RefError as e:
        raise GateError(str(e)) from None


def _adapter(s: Any, text: str, what: str) -> store.AdapterInfo:
    name, version = _ref(text, what)
    found = store.find_adapter(s, name, version)
    if found is None:
        raise GateError(f"{what} {name}:{version if version is not None else 'latest'} is not registered "
                        "(tad adapters list)")
    return found


def _check_weights(adapter: store.AdapterInfo) -> None:
    """The registered weights must still be the ones on disk before results are computed and labelled with them."""
    from tad_core.adapter_dir import weights_file
    from tad_core.assets import sha256_file

    weights = weights_file(Path(adapter.path))
    if weights is None:
        raise GateError(f"adapter {adapter.label}: no weights at {adapter.path} any more")
    if sha256_file(weights) != adapter.sha256:
        raise GateError(f"adapter {adapter.label}: the weights at {adapter.path} changed since registration "
                        f"(registered sha256 {adapter.sha256[:12]}); register them as a new version")


def plan_gate(candidate: str, suite: str, against: str | None = None, *, alpha: float = 0.05,
              min_effect: float = 0.01, force: bool = False, submitted_by: str = "", token: str | None = None,
              settings: Settings | None = None,
              record: Callable[[Session, dict[int, int]], None] | None = None) -> GatePlan:
    """Resolve and validate everything, reuse what is stored, and plan (store, not run) the missing jobs.

    Raises GateError / SubmissionError before anything is stored when the request is invalid. The jobs are
    stored in one transaction with whatever `record(session, {job id: samples})` stores (a gate records its job
    ids so): a crash cannot leave jobs that nothing refers to, and `record` raising stores no job.
    """
    settings = settings or get_settings()
    if not 0 < alpha <= 1:
        raise GateError(f"--alpha must be in (0, 1], got {alpha}")
    if not 0 <= min_effect < 1:
        raise GateError(f"--min-effect must be in [0, 1), got {min_effect}")
    with session_scope(settings) as s:
        name, version = _ref(suite, "suite")
        suite_info = store.find_suite(s, name, version)
        if suite_info is None:
            raise GateError(f"suite {name}:{version if version is not None else 'latest'} is not registered "
                            "(tad suites add FILE; tad suites list)")
        cand = _adapter(s, candidate, "candidate")
        if against is not None:
            base = _adapter(s, against, "baseline")
        else:
            base = store.promoted_adapter(s, cand.name)
            if base is None:
                raise GateError(f"adapter {cand.name} has no promoted version to compare with: promote one "
                                f"(tad adapters promote {cand.name}:VERSION) or pass --against NAME:VERSION")
        if base.id == cand.id:
            raise GateError(f"candidate {cand.label} is the baseline itself; compare another version "
                            "(or pass --against)")
        if base.base_model != cand.base_model:
            raise GateError(f"candidate {cand.label} belongs to base model {cand.base_model!r}, baseline "
                            f"{base.label} to {base.base_model!r}: adapters of different bases are not comparable")
    spec = SuiteSpec.from_json(suite_info.spec)
    sides: list[_SideRun] = []
    for adapter in (base, cand):
        for d in spec.datasets:
            req = SubmitRequest(dataset=d.dataset, strategies=spec.strategies, base=adapter.base_model,
                                adapter=adapter.label, split=d.split, limit=d.limit, config=dict(spec.config),
                                submitted_by=submitted_by, token=token)
            v = validate_request(req, settings)
            sides.append(_SideRun(adapter, d, v, run_hashes(v, adapter.sha256)))
    # decide what is reused (or shared within this gate) before storing anything
    first: dict[frozenset[str], _SideRun] = {}
    todo: list[_SideRun] = []
    for side in sides:
        ident = frozenset(side.hashes.values())
        if ident in first:  # same weights on the same data: computed (or reused) once by this gate
            side.shared_with = first[ident]
            continue
        first[ident] = side
        if not force:
            with session_scope(settings) as s:
                found = {k: store.runs_by_hash(s, h) for k, h in side.hashes.items()}
            if all(found.values()):
                side.runs = {k: runs[0] for k, runs in found.items()}
                continue
        todo.append(side)
    for adapter in {side.adapter.id: side.adapter for side in todo}.values():
        _check_weights(adapter)
    jobs: dict[int, int] = {}
    with session_scope(settings) as s:  # every job, and what `record` stores about them, or nothing
        for side in todo:
            plan = plan_validated(side.request, settings, session=s)
            side.job_id = plan.job.id
            side.runs = {r.key: r for r in plan.runs}
            jobs[plan.job.id] = plan.job.n_samples
        if record is not None:
            record(s, jobs)
    return GatePlan(cand, base, suite_info, alpha, min_effect, sides, jobs)


def _check_finished(settings: Settings, job_ids: list[int]) -> None:
    with session_scope(settings) as s:
        bad = [store.get_job(s, j) for j in job_ids]
    bad = [j for j in bad if j.status != "done"]
    if bad:
        raise EvaluationFailed("; ".join(f"job {j.id} ended {j.status}" + (f": {j.error}" if j.error else "")
                                         for j in bad))


def run_embedded(plan: GatePlan, settings: Settings | None = None, *,
                 progress: Callable[[int], None] | None = None) -> None:
    """Run the planned jobs in this process (the workers' shard function); EvaluationFailed if one fails."""
    settings = settings or get_settings()
    for job_id in plan.jobs:
        run_job_embedded(job_id, settings, progress=progress)
    _check_finished(settings, list(plan.jobs))


def run_on_workers(plan: GatePlan, settings: Settings | None = None, *,
                   progress: Callable[[int], None] | None = None, timeout: float | None = None,
                   poll: float = 1.0) -> None:
    """Queue the planned jobs' shards for the Celery workers and wait until every job ends.

    `progress(samples_done)` is called with the total samples stored so far. EvaluationFailed when a job does
    not end `done` or `timeout` seconds pass (the jobs keep running on the workers).
    """
    settings = settings or get_settings()
    job_ids = list(plan.jobs)
    try:
        enqueue_all_or_fail(job_ids, settings)
    except QueueUnavailable as e:
        raise EvaluationFailed(f"the broker is unreachable ({e.cause}); jobs {job_ids} marked failed") from e
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with session_scope(settings) as s:
            jobs = [store.get_job(s, j) for j in job_ids]
        if progress is not None:
            progress(sum(j.samples_done for j in jobs))
        if all(j.finished for j in jobs):
            break
        if deadline is not None and time.monotonic() > deadline:
            raise EvaluationFailed(f"timed out after {timeout:g} s waiting for jobs {job_ids} (still running on "
                                   "the workers; `tad jobs` shows them)")
        time.sleep(poll)
    _check_finished(settings, job_ids)


def finish_gate(plan: GatePlan, settings: Settings | None = None) -> GateResult:
    """Compare the candidate's runs with the baseline's per dataset and strategy, give verdicts, store the check
    (not when the gate has no verdict: `check_id` is then None)."""
    from tad_core.metrics import holm, mcnemar, mcnemar_exact_ci

    settings = settings or get_settings()
    by_key = {(side.adapter.id, side.dataset): side for side in plan.sides}
    rows: list[dict[str, Any]] = []
    with session_scope(settings) as s:
        for d in SuiteSpec.from_json(plan.suite.spec).datasets:
            b_side, c_side = by_key[(plan.baseline.id, d)], by_key[(plan.candidate.id, d)]
            b_runs = (b_side.shared_with or b_side).runs
            c_runs = (c_side.shared_with or c_side).runs
            for key in c_side.hashes:
                b_run, c_run = b_runs[key], c_runs[key]
                pairs = views.paired_outcomes(s, b_run.id, c_run.id)
                # a sample that failed on one side only is not in `pairs`: a candidate that fails on its hard samples
                # would otherwise be compared on the easy ones
                one_sided = views.error_indices(s, b_run.id) ^ views.error_indices(s, c_run.id)
                row: dict[str, Any] = dict(
                    dataset=b_side.request.data.name, split=d.split, limit=d.limit, strategy=key, n=len(pairs),
                    baseline_acc=None, candidate_acc=None, diff=None, ci_low=None, ci_high=None, p_value=None,
                    fixed=0, broken=0, one_sided_errors=len(one_sided), baseline_run_id=b_run.id,
                    candidate_run_id=c_run.id,
                    baseline_reused=b_side.reused, candidate_reused=c_side.reused)
                if pairs:
                    a = [p.a_correct for p in pairs]
                    b = [p.b_correct for p in pairs]
                    res = mcnemar(a, b)
                    lo, hi = mcnemar_exact_ci(res.fixed, res.broken, len(pairs), 1 - plan.alpha)
                    row.update(baseline_acc=sum(a) / len(a), candidate_acc=sum(b) / len(b), diff=res.diff,
                               ci_low=lo, ci_high=hi, p_value=res.p_value, fixed=res.fixed, broken=res.broken)
                rows.append(row)
        adjusted = holm([r["p_value"] if can_reach(r["n"], plan.alpha) else None for r in rows])
        gate_rows = [GateRow(**r, p_holm=adj, verdict=(
            "no data" if r["n"] == 0 else "errors" if r["one_sided_errors"] else "too few" if adj is None
            else verdict(r["diff"], adj, plan.alpha, plan.min_effect))) for r, adj in zip(rows, adjusted)]
        result = GateResult(None, plan.candidate.label, plan.baseline.label, plan.suite.label, plan.alpha,
                            plan.min_effect, gate_rows, list(plan.jobs))
        if result.verdict == "no verdict":
            return result
        check_id = store.record_regression_check(
            s, suite_id=plan.suite.id, candidate_id=plan.candidate.id, baseline_id=plan.baseline.id,
            alpha=plan.alpha, min_effect=plan.min_effect, verdict=result.verdict, rows=[asdict(r) for r in gate_rows])
    return replace(result, check_id=check_id)
