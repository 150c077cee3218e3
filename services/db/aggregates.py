"""Run aggregates from per-shard partial sums: accuracy, counts, paired counts vs `ft` and mean kv statistics.

Aggregates are refreshed after every shard, so a refresh that reads every stored row costs more the bigger the
job: averaging the kv JSON in Python took 1.07 s per 50,000-row job, in the database (`jsonb_each`) still 0.3-0.5 s.
Every run metric is a ratio or a mean of sums over samples (n, errors, correct / scored, tokens, latency, flip
rate over non-null, ties over MC rows, unparsed over generated rows, fixed / broken vs ft over paired samples,
kv means), and sums decompose over sample ranges. So when a shard ends, `store_shard_partials` computes the sums
of its own range, in SQL over that range only (index range scans on (run_id, sample_index)), into
`shard_aggregates`; `refresh_aggregates` adds up the partials of each run (one small grouped query) and turns the
sums into metrics in `metrics_from_sums`. The numbers are those of the Python reference
(`services.db.results.refresh_aggregates`, which reads every row); tests compare them on both dialects.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, bindparam, case, delete, func, select, text
from sqlalchemy.orm import Session, aliased

from tad_core.metrics import mcnemar_p, proportion_stderr

from services.db.dialect import dialect_insert
from services.db.models import Run, RunAggregate, SampleResult, Shard, ShardAggregate, utcnow

Metric = tuple[float | None, float | None, int]  # value, stderr, n
Sums = dict[str, tuple[float, int]]  # metric name -> (total, n), summed over samples
_CHUNK = 500  # run ids per statement when rebuilding many runs (SQLite allows 32,766 bound parameters)

# Sum and count of every finite scalar number in each row's kv object, per run and key, over one sample range.
# Booleans, strings, lists (top-k token ids) and nested objects are skipped, as the Python reference skips them;
# a kv that is not an object (SQL NULL, JSON null) contributes nothing. JSON cannot hold NaN or infinities (rows
# are stored through `_json_safe`), so every number is finite.
_KV_SUMS = {
    "postgresql": """
        SELECT r.run_id, e.key, sum((e.value)::float8), count(*)
        FROM sample_results r
        CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(r.kv) = 'object' THEN r.kv ELSE '{}'::jsonb END) e
        WHERE r.run_id IN :run_ids AND r.sample_index >= :start AND r.sample_index < :stop
          AND jsonb_typeof(e.value) = 'number'
        GROUP BY r.run_id, e.key""",
    "sqlite": """
        SELECT r.run_id, e.key, sum(e.value), count(*)
        FROM sample_results r, json_each(CASE WHEN json_type(r.kv) = 'object' THEN r.kv ELSE '{}' END) e
        WHERE r.run_id IN :run_ids AND r.sample_index >= :start AND r.sample_index < :stop
          AND e.type IN ('integer', 'real')
        GROUP BY r.run_id, e.key""",
}


def _ft_runs(session: Session, run_ids: list[int]) -> dict[int, int]:
    """Run id -> the id of its job's `ft` run, for the runs of `run_ids` that are not an ft run themselves. A job
    has at most one: `ft` takes no parameters, so its run key is always "ft", and (job_id, key) is unique; the
    `min` only makes the join a mapping."""
    ft_run = aliased(Run)
    stmt = (select(Run.id, func.min(ft_run.id))
            .join(ft_run, and_(ft_run.job_id == Run.job_id, ft_run.strategy == "ft", ft_run.id != Run.id))
            .where(Run.id.in_(run_ids)).group_by(Run.id))
    return {int(run_id): int(ft_id) for run_id, ft_id in session.execute(stmt)}


def _partial_columns(a: Any, b: Any | None) -> dict[str, tuple[Any, Any]]:
    """Metric name -> (total, n) SQL aggregates over rows `a` (an alias of SampleResult), each left-joined with
    its ft row `b` when there is one. `metrics_from_sums` reads the same names."""
    rows = func.count()
    count_if = lambda cond: func.sum(case((cond, 1), else_=0))  # noqa: E731
    cols = {
        "n": (rows, rows),
        "errors": (func.count(a.error), rows),  # rows without a result (over budget, evaluation raised)
        "acc": (count_if(a.correct.is_(True)), func.count(a.correct)),
        "acc_norm": (count_if(a.correct_norm.is_(True)), func.count(a.correct_norm)),
        "tokens": (func.sum(a.tokens), rows),
        "latency_s": (func.sum(a.latency_s), rows),
        "flip_rate": (func.sum(a.flip_rate), func.count(a.flip_rate)),
        "ties": (count_if(a.tie.is_(True)), func.count(a.tie)),  # tie-break decisions, out of the MC rows
        # generated outputs with no extractable answer, out of the generated rows
        "unparsed": (count_if(and_(a.output.is_not(None), a.extracted.is_(None))), func.count(a.output)),
    }
    if b is not None:  # samples both runs scored (`correct` known on both sides)
        paired = and_(a.correct.is_not(None), b.correct.is_not(None))
        cols["fixed_vs_ft"] = (count_if(and_(paired, a.correct.is_(True), b.correct.is_(False))), count_if(paired))
        cols["broken_vs_ft"] = (count_if(and_(paired, a.correct.is_(False), b.correct.is_(True))), count_if(paired))
    return cols


def range_sums(session: Session, run_ids: list[int], start: int, stop: int) -> dict[int, Sums]:
    """The partial sums of samples [start, stop) of each run: the counting metrics and the paired counts vs the
    job's ft run in one pass (each row left-joined with its ft row; the run -> ft map spelled as a CASE, so the
    ft rows of the range are read once), then the kv sums (`_KV_SUMS`). Runs without rows in the range are absent."""
    ft_of = _ft_runs(session, run_ids)
    a = aliased(SampleResult)
    b = aliased(SampleResult) if ft_of else None
    cols = _partial_columns(a, b)
    stmt = (select(a.run_id, *(c for pair in cols.values() for c in pair))
            .where(a.run_id.in_(run_ids), a.sample_index >= start, a.sample_index < stop).group_by(a.run_id))
    if b is not None:
        stmt = stmt.outerjoin(b, and_(b.run_id == case(ft_of, value=a.run_id), b.sample_index == a.sample_index,
                                      b.run_id.in_(sorted(set(ft_of.values()))),
                                      b.sample_index >= start, b.sample_index < stop))
    out: dict[int, Sums] = {}
    for run_id, *values in session.execute(stmt):
        out[run_id] = {name: (float(values[2 * i] or 0), int(values[2 * i + 1] or 0)) for i, name in enumerate(cols)}
    dialect = session.get_bind().dialect.name
    if dialect not in _KV_SUMS:
        raise NotImplementedError(f"kv aggregates for the {dialect} dialect (supported: postgresql, sqlite)")
    kv = text(_KV_SUMS[dialect]).bindparams(bindparam("run_ids", expanding=True))
    for run_id, key, total, n in session.execute(kv, {"run_ids": run_ids, "start": start, "stop": stop}):
        out[run_id][f"kv.{key}"] = (float(total), int(n))
    return out


def store_shard_partials(session: Session, run_ids: Iterable[int], start: int, stop: int) -> int:
    """Compute the partial sums of samples [start, stop) of `run_ids` from their stored rows and make them the
    partials of the shard starting at `start` (its previous ones deleted first: a redelivered or resumed shard
    recomputes its whole range, so nothing is counted twice). Call it once the shard's rows are stored, in the
    transaction that finishes the shard. Returns the number of partial rows written."""
    run_ids = list(run_ids)
    if not run_ids:
        return 0
    sums = range_sums(session, run_ids, start, stop)
    session.execute(delete(ShardAggregate).where(ShardAggregate.run_id.in_(run_ids), ShardAggregate.start == start))
    values = [{"run_id": r, "start": start, "name": name, "total": total, "n": n}
              for r, s in sums.items() for name, (total, n) in s.items() if n]
    if values:  # an upsert, not an insert: a racing redelivery of the same shard writes the same sums
        ins = dialect_insert(session, ShardAggregate)
        session.execute(ins.on_conflict_do_update(
            index_elements=[ShardAggregate.run_id, ShardAggregate.start, ShardAggregate.name],
            set_={"total": ins.excluded.total, "n": ins.excluded.n}), values)
    return len(values)


def rebuild_partials(session: Session, run_ids: Iterable[int]) -> None:
    """Recompute every partial of `run_ids` from their stored rows, one per shard of their jobs (the `shards`
    table's ranges): the backfill of migration 0008, and for rows stored without the write path (bench, seeds)."""
    run_ids = list(run_ids)
    for i in range(0, len(run_ids), _CHUNK):  # a whole database's runs (the backfill): bounded IN lists
        chunk = run_ids[i:i + _CHUNK]
        session.execute(delete(ShardAggregate).where(ShardAggregate.run_id.in_(chunk)))
        ranges: dict[tuple[int, int, int], list[int]] = {}
        for run_id, job_id, start, stop in session.execute(
                select(Run.id, Run.job_id, Shard.start, Shard.stop).join(Shard, Shard.job_id == Run.job_id)
                .where(Run.id.in_(chunk)).order_by(Run.job_id, Shard.start, Run.id)):
            ranges.setdefault((job_id, start, stop), []).append(run_id)
        for (_, start, stop), ids in ranges.items():
            store_shard_partials(session, ids, start, stop)


def metrics_from_sums(sums: Sums) -> dict[str, Metric]:
    """One run's metrics (value, stderr, n) from its sums over all samples: proportions with their stderr,
    means, counts out of their base, McNemar's exact p from the fixed / broken counts. A metric whose base is
    empty is left out, as the Python reference leaves it out."""
    out: dict[str, Metric] = {}
    for name, (total, n) in sums.items():
        if not n:
            continue
        if name in ("acc", "acc_norm"):
            p = total / n
            out[name] = (p, proportion_stderr(p, n), n)
        elif name == "n":
            out[name] = (float(n), None, n)
        elif name in ("tokens", "latency_s", "flip_rate") or name.startswith("kv."):
            out[name] = (total / n, None, n)
        elif name in ("ties", "unparsed", "fixed_vs_ft", "broken_vs_ft") or (name == "errors" and total):
            out[name] = (float(total), None, n)
    if "fixed_vs_ft" in out:
        fixed, broken = sums["fixed_vs_ft"][0], sums["broken_vs_ft"][0]
        out["mcnemar_p_vs_ft"] = (mcnemar_p(round(fixed), round(broken)), None, sums["fixed_vs_ft"][1])
    return out


def run_sums(session: Session, run_ids: list[int]) -> dict[int, Sums]:
    """Each run's sums over all its samples: its shards' partials added up (one grouped query)."""
    out: dict[int, Sums] = {}
    for run_id, name, total, n in session.execute(
            select(ShardAggregate.run_id, ShardAggregate.name, func.sum(ShardAggregate.total),
                   func.sum(ShardAggregate.n))
            .where(ShardAggregate.run_id.in_(run_ids)).group_by(ShardAggregate.run_id, ShardAggregate.name)):
        out.setdefault(run_id, {})[name] = (float(total), int(n))
    return out


def refresh_aggregates(session: Session, run_ids: Iterable[int]) -> None:
    """Recompute each run's aggregates (acc, acc_norm, tokens, latency, flip rate, ties, unparsed, errors,
    fixed/broken and McNemar p vs the job's `ft` run, mean kv statistics) from its shards' partials."""
    run_ids = list(run_ids)
    if not run_ids:
        return
    write_metrics(session, {r: metrics_from_sums(s) for r, s in run_sums(session, run_ids).items()})


def write_metrics(session: Session, metrics: dict[int, dict[str, Metric]]) -> None:
    """Upsert `metrics` (run id -> metric -> (value, stderr, n)) into run_aggregates."""
    now = utcnow()
    values = [{"run_id": r, "metric": k, "value": v, "stderr": se, "n": n, "updated_at": now}
              for r, ms in metrics.items() for k, (v, se, n) in ms.items()]
    if values:
        ins = dialect_insert(session, RunAggregate)
        session.execute(ins.on_conflict_do_update(
            index_elements=[RunAggregate.run_id, RunAggregate.metric],
            set_={c: getattr(ins.excluded, c) for c in ("value", "stderr", "n", "updated_at")}), values)
