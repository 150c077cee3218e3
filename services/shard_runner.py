"""Worker shard execution: `run_shard(job_id, start, stop)` is THE unit of work. The Celery task and embedded
mode both call it: it claims the shard (attempt counted in the DB), loads the model pair through a per-process
cache, reads the samples from the DB, resolves calibrated parameters once, evaluates batch by batch and upserts
each batch's rows at once (results stream), stops at a batch boundary when the job is cancelled, then stores the
shard's partial sums, marks the shard done (the job finished when it was the last shard) and refreshes the run
aggregates from the partials.

A shard survives its samples: each sample is checked against the per-sample budgets (services.budgets) before
it is evaluated, a batch that raises is evaluated again sample by sample, and a sample that is over budget or
raises alone gets rows that record the error (`sample_results.error`) while the shard's other samples are stored
as usual. A running batch is interrupted within `TAD_INTERRUPT_CHECK_INTERVAL` seconds when the job is cancelled
or the attempt passes `TAD_SHARD_TIME_LIMIT` (services.interrupt); a later attempt resumes after the samples an
earlier one stored. Test-only fault hooks: services.fault_hooks.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from services import heartbeat
from services.db import aggregates, store
from services.db.session import session_scope
from services.fault_hooks import batch_fault, sample_fault
from services.heartbeat import worker_name
from services.model_cache import clear_pair_cache, get_pair
from services.result_rows import error_rows, result_rows
from services.settings import Settings, get_settings

log = logging.getLogger(__name__)


class ShardRetry(RuntimeError):
    """An attempt of a shard failed and the shard may be retried (the attempt cap is not reached)."""


@dataclass(frozen=True)
class ShardOutcome:
    job_id: int
    start: int
    stop: int
    action: str  # ran | done | failed | cancelled | busy (what happened on this delivery)
    samples: int = 0
    job_status: str = ""


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _holder_alive(session: Any, settings: Settings) -> Callable[[str, int], bool]:
    """A predicate for `store.claim_shard`: does the worker process named `host:pid` still run shard `shard_id`?
    Yes when it beat within `dead_after_s` naming that shard and, when it runs on this machine, its pid still
    exists (a child killed a second ago still has a fresh heartbeat, but its redelivered shard must run now, not
    after the heartbeat goes stale)."""
    fresh = {w.worker: w.shard_id for w in store.list_workers(session, seen_within_s=settings.dead_after_s)}
    host = socket.gethostname()

    def alive(name: str, shard_id: int) -> bool:
        if name not in fresh or fresh[name] != shard_id:
            return False
        pid = heartbeat.lane_pid(name)
        return not (name.rpartition(":")[0] == host and pid is not None and not _pid_alive(pid))

    return alive


def _transient(exc: BaseException) -> bool:
    """Database connection trouble (dropped backend, restart): not the shard's fault."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def run_shard(job_id: int, start: int, stop: int, settings: Settings | None = None, *,
              progress: Callable[[int], None] | None = None) -> ShardOutcome:
    """Evaluate samples [start, stop) of job `job_id` for all its runs, streaming rows to the DB per batch.

    Returns what happened. Raises ShardRetry when this attempt failed and the shard may be retried; a shard whose
    attempts reach `settings.max_redeliveries` is marked failed instead (the rest of the job goes on).
    `progress(n)` is called with the number of samples finished after each batch.
    """
    settings = settings or get_settings()
    me = worker_name()
    with session_scope(settings) as s:
        claim = store.claim_shard(s, job_id, start, me, settings.max_redeliveries,
                                  holder_alive=_holder_alive(s, settings))
        if claim.action == "busy":
            log.info("shard %s [%d,%d) is running in live process %s; this delivery is dropped", job_id, start,
                     stop, claim.shard.worker)
        elif claim.action == "run" and claim.shard.attempts > 1 and claim.shard.error:
            log.warning("shard %s [%d,%d): %s; attempt %d starts", job_id, start, stop, claim.shard.error,
                        claim.shard.attempts)
        if claim.action != "run":
            return ShardOutcome(job_id, start, stop, claim.action, job_status=store.get_job(s, job_id).status)
        job = store.get_job(s, job_id)
        runs = store.job_runs(s, job_id)
        raw = store.load_samples(s, job.dataset_id, start, stop)
        store.heartbeat(s, me, os.getpid(), job_id, claim.shard.id)
    shard_id = claim.shard.id
    heartbeat.working_on(job_id, shard_id)  # the worker's periodic beats report this shard while it runs
    try:
        try:
            done = _evaluate_shard(job, runs, raw, start, shard_id, settings, progress)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the shard, then retried or failed
            return _attempt_failed(job_id, start, stop, shard_id, claim.shard.attempts, exc, settings)
        with session_scope(settings) as s:
            if done < len(raw):
                info = _close_shard(s, job_id, start, stop, shard_id, "cancelled")
                return ShardOutcome(job_id, start, stop, "cancelled", done, info.status)
            info = _close_shard(s, job_id, start, stop, shard_id, "done")
            store.heartbeat(s, me, os.getpid())
        return ShardOutcome(job_id, start, stop, "ran", done, info.status)
    finally:
        heartbeat.working_on(None, None)


def _close_shard(s: Any, job_id: int, start: int, stop: int, shard_id: int, status: str,
                 error: str | None = None) -> store.JobInfo:
    """End a shard (done, cancelled or failed) in one transaction: the partial sums of the rows it stored
    (services.db.aggregates; a redelivered or resumed shard replaces its earlier ones), the shard's status with
    the job's counters, then the runs' aggregates. The refresh comes after `finish_shard` has locked the job's
    row, so of two shards ending together the second one's refresh sees the first one's committed partials."""
    run_ids = [r.id for r in store.job_runs(s, job_id)]
    aggregates.store_shard_partials(s, run_ids, start, stop)
    info = store.finish_shard(s, shard_id, status, error)
    aggregates.refresh_aggregates(s, run_ids)
    return info


class ShardTimeLimit(RuntimeError):
    """An attempt of a shard ran past TAD_SHARD_TIME_LIMIT; what it stored is kept and the next attempt resumes."""


def _evaluate_shard(job: store.JobInfo, runs: list[store.RunInfo], raw: list[dict[str, Any]], start: int,
                    shard_id: int, settings: Settings, progress: Callable[[int], None] | None) -> int:
    """Evaluate the shard's samples batch by batch, storing each batch's rows at once; returns how many samples
    have rows (fewer than the shard's when the job was cancelled). Samples an earlier attempt stored are skipped."""
    from tad_core.evaluate import EvalConfig
    from tad_core.samples import Sample
    from tad_core.strategies import StrategySpec

    from services.budgets import Budgets, generation_over_budget, over_budget, token_counter
    from services.interrupt import Interrupted, interruptible

    started = time.monotonic()
    deadline = started + settings.shard_time_limit if settings.shard_time_limit else None
    spec = job.spec
    pair = get_pair(spec, settings)
    specs = [StrategySpec.from_json(d) for d in spec["strategies"]]
    config = EvalConfig.from_json(spec["config"])
    run_ids = {r.key: r.id for r in runs}
    specs, run_ids = _resolve_calibrations(job, runs, specs, run_ids, pair, settings)
    samples = [Sample.from_dict(d) for d in raw]
    with session_scope(settings) as s:
        stored = store.stored_sample_indices(s, list(run_ids.values()), start, start + len(samples))
    todo = [(start + i, smp) for i, smp in enumerate(samples) if start + i not in stored]
    done = len(samples) - len(todo)
    if done:
        log.info("shard %s [%d,%d): resuming after %d stored samples", job.id, start, start + len(samples), done)
        if progress is not None:
            progress(done)
    budgets = Budgets.from_settings(settings)
    count = token_counter(pair.tokenizer)
    gen_error = generation_over_budget(config.max_new_tokens, budgets)
    context = _format_context(job, config.format, settings)
    bs = max(1, int(getattr(config, "batch_size", 8) or 8))

    def why_interrupt() -> str | None:
        if deadline is not None and time.monotonic() > deadline:
            return "time limit"
        with session_scope(settings) as s:
            return "cancelled" if store.cancel_requested(s, job.id) else None

    for i in range(0, len(todo), bs):
        with session_scope(settings) as s:
            if store.cancel_requested(s, job.id):
                return done
        if deadline is not None and time.monotonic() > deadline:
            raise ShardTimeLimit(f"shard time limit of {settings.shard_time_limit:g} s exceeded "
                                 f"(TAD_SHARD_TIME_LIMIT); {done} samples stored")
        batch = todo[i:i + bs]
        batch_fault([smp for _, smp in batch])
        rows: list[dict[str, Any]] = []
        runnable = []
        for index, smp in batch:
            why = over_budget(smp, budgets, count, config.delimiter) or (gen_error if smp.kind == "gen" else None)
            if why:
                log.warning("job %s sample %d (%s) skipped: over budget: %s", job.id, index, smp.id, why)
                rows += error_rows(index, smp.id, run_ids, f"over budget: {why}")
            else:
                runnable.append((index, smp))
        try:
            with interruptible(why_interrupt, settings.interrupt_check_interval):
                rows += _evaluate_isolated(pair, runnable, specs, config, context, run_ids, job.id)
        except Interrupted:
            clear_pair_cache()  # the model was stopped mid-call: the next shard loads a fresh copy
            if deadline is not None and time.monotonic() > deadline:
                raise ShardTimeLimit(f"shard time limit of {settings.shard_time_limit:g} s exceeded "
                                     f"(TAD_SHARD_TIME_LIMIT); {done} samples stored") from None
            log.info("job %s cancelled: shard at %d interrupted mid-batch", job.id, start)
            return done
        with session_scope(settings) as s:
            store.upsert_sample_results(s, rows)
            done += len(batch)
            store.shard_progress(s, shard_id, done)
        if progress is not None:
            progress(len(batch))
    return done


def _evaluate_isolated(pair: Any, items: list[tuple[int, Any]], specs: list[Any], config: Any, context: Any,
                       run_ids: dict[str, int], job_id: int) -> list[dict[str, Any]]:
    """Rows of `items` ((sample index, Sample) pairs) evaluated as one batch; when the batch raises, each sample
    is evaluated alone, so one poisoned sample gets error rows and costs its batch-mates nothing. Database
    trouble is not the samples' fault: it propagates (the attempt is retried)."""
    from tad_core.evaluate import evaluate_batch

    if not items:
        return []
    batch = [smp for _, smp in items]
    try:
        sample_fault(batch)
        results = evaluate_batch(pair, batch, specs, config, context)
    except Exception as exc:  # noqa: BLE001 - isolated below; recorded on the sample when it fails alone
        if _transient(exc):
            raise
        if len(items) > 1:
            return [row for item in items
                    for row in _evaluate_isolated(pair, [item], specs, config, context, run_ids, job_id)]
        index, smp = items[0]
        error = f"{type(exc).__name__}: {exc}"
        log.warning("job %s sample %d (%s) failed: %s", job_id, index, smp.id, error)
        return error_rows(index, smp.id, run_ids, error)
    return [row for (index, _), res in zip(items, results) for row in result_rows([res], index, run_ids)]


def _format_context(job: store.JobInfo, fmt: str, settings: Settings) -> Any:
    """The job's prompt-format context: its dataset's name (per-dataset wording) and, for k-shot, the
    demonstration pool (the registered train split, else the job's whole dataset from the DB)."""
    from tad_core.formats import format_context, parse_format
    from tad_core.samples import Sample

    name = str(job.spec.get("dataset", ""))
    pool: list[Any] = []
    if parse_format(fmt).needs_pool:
        from tad_core.datasets import REGISTRY

        from tad_core.datasets.shuffle import unshuffled_name

        if unshuffled_name(name) not in REGISTRY:
            with session_scope(settings) as s:
                pool = [Sample.from_dict(d) for d in store.load_samples(s, job.dataset_id, 0, 1 << 30)]
    return format_context(fmt, name, pool)


def _resolve_calibrations(job: store.JobInfo, runs: list[store.RunInfo], specs: list[Any], run_ids: dict[str, int],
                          pair: Any, settings: Settings) -> tuple[list[Any], dict[str, int]]:
    """Turn `svdecode(mu=auto)` into its calibrated numeric mu, once per run: the first shard calibrates (on the
    train split of the job's registered dataset; stored and reused, see tad_core.calibration) and records
    mu + calibration key in the run's `info`; every later shard, on any worker, uses the recorded values.
    Outcomes of a resolved spec are stored under the original run (its key keeps `mu=auto`)."""
    from tad_core.calibration import cached_calibration, needs_calibration
    from tad_core.strategies import StrategySpec, canonical

    if not any(needs_calibration(sp) for sp in specs):
        return specs, run_ids
    by_key = {r.key: r for r in runs}
    out, ids = [], dict(run_ids)
    for sp in specs:
        if not needs_calibration(sp):
            out.append(sp)
            continue
        run = by_key[sp.key]
        if "mu" not in (run.info or {}):
            cal = cached_calibration(pair, job.spec["dataset"], "train", n=settings.calibration_samples,
                                     beta=sp.params["beta"])
            with session_scope(settings) as s:  # first writer wins: a racing shard keeps the recorded values
                if "mu" not in (next(r for r in store.job_runs(s, job.id) if r.id == run.id).info or {}):
                    store.set_run_info(s, run.id, {"mu": float(f"{cal.mu:.6g}"), "calibration": cal.key,
                                                   "calibration_n_tokens": cal.n_tokens,
                                                   "calibration_n_samples": cal.n_samples,
                                                   "calibration_dataset": f"{cal.dataset}:{cal.split}"})
            with session_scope(settings) as s:
                run = next(r for r in store.job_runs(s, job.id) if r.id == run.id)
        resolved = canonical(StrategySpec(sp.name, {**sp.params, "mu": run.info["mu"],
                                                    "calibration": run.info["calibration"]}))
        out.append(resolved)
        ids[resolved.key] = ids.pop(sp.key)
    return out, ids


def _attempt_failed(job_id: int, start: int, stop: int, shard_id: int, attempts: int, exc: BaseException,
                    settings: Settings) -> ShardOutcome:
    error = f"{type(exc).__name__}: {exc}"[:2000]
    transient = _transient(exc)
    log.warning("shard %s [%d,%d) attempt %d failed: %s", job_id, start, stop, attempts, error)
    with session_scope(settings) as s:
        if attempts >= settings.max_redeliveries and not transient:
            info = _close_shard(s, job_id, start, stop, shard_id, "failed",
                                f"failed after {attempts} attempts; last error: {error}")
            return ShardOutcome(job_id, start, stop, "failed", 0, info.status)
        store.release_shard(s, shard_id, error, heartbeat.worker_name(), attempts, refund_attempt=transient)
    raise ShardRetry(error) from exc


def run_job_embedded(job_id: int, settings: Settings | None = None, *,
                     progress: Callable[[int], None] | None = None) -> store.JobInfo:
    """Execute every open shard of a job in this process, through `run_shard` (the workers' code path)."""
    settings = settings or get_settings()
    with session_scope(settings) as s:
        shards = [(sh.start, sh.stop) for sh in store.job_shards(s, job_id) if sh.status in ("queued", "running")]
    with heartbeat.own_lane():  # one lane per embedded job: the dashboard runs several at once in threads
        beats = heartbeat.HeartbeatThread(settings, info={"embedded": True})  # so no sweeper takes it for dead
        beats.start()
        try:
            for start, stop in shards:
                while True:
                    try:
                        run_shard(job_id, start, stop, settings, progress=progress)
                        break
                    except ShardRetry:
                        continue
        finally:
            beats.stop()
    with session_scope(settings) as s:
        return store.get_job(s, job_id)
