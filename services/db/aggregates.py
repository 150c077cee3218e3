"""Run aggregates computed by the database: accuracy, counts, paired counts vs `ft` and mean kv statistics.

Aggregates are refreshed after every shard, so their cost grows with a job's size. The first implementation
averaged each row's kv JSON in Python (1.07 s for a 50,000-row job on Postgres, 18.6 s for 100 runs); here every
figure is a grouped SQL query, with the JSON taken apart by the database's own JSON functions (`jsonb_each` on
Postgres, `json_each` on SQLite), so only one row per (run, metric) leaves the database. The numbers are those of
the Python averaging (tests compare them on both dialects).
"""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import and_, bindparam, case, func, select, text
from sqlalchemy.orm import Session, aliased

from tad_core.metrics import mcnemar_p, proportion_stderr

from services.db.dialect import dialect_insert
from services.db.models import Run, RunAggregate, SampleResult, utcnow

Metric = tuple[float | None, float | None, int]  # value, stderr, n

# Mean and count of every finite scalar number in each row's kv object, per run and key. Booleans, strings, lists
# (top-k token ids) and nested objects are skipped, as the Python averaging skipped them; a kv that is not an
# object (SQL NULL, JSON null) contributes nothing. JSON cannot hold NaN or infinities (rows are stored through
# `_json_safe`), so every number is finite.
_KV_MEANS = {
    "postgresql": """
        SELECT r.run_id, e.key, avg((e.value)::float8), count(*)
        FROM sample_results r
        CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(r.kv) = 'object' THEN r.kv ELSE '{}'::jsonb END) e
        WHERE r.run_id IN :run_ids AND jsonb_typeof(e.value) = 'number'
        GROUP BY r.run_id, e.key""",
    "sqlite": """
        SELECT r.run_id, e.key, avg(e.value), count(*)
        FROM sample_results r, json_each(CASE WHEN json_type(r.kv) = 'object' THEN r.kv ELSE '{}' END) e
        WHERE r.run_id IN :run_ids AND e.type IN ('integer', 'real')
        GROUP BY r.run_id, e.key""",
}


def count_metrics(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Metric]]) -> None:
    """Accuracy with its stderr, mean tokens / latency / flip rate, ties, unparsed outputs and error rows (one
    grouped query; also the counting part of the Python reference in services.db.results)."""
    as_int = lambda c: func.sum(case((c.is_(True), 1), else_=0))  # noqa: E731
    stmt = (select(SampleResult.run_id, func.count(), func.count(SampleResult.correct), as_int(SampleResult.correct),
                   func.count(SampleResult.correct_norm), as_int(SampleResult.correct_norm),
                   func.avg(SampleResult.tokens), func.avg(SampleResult.latency_s), func.avg(SampleResult.flip_rate),
                   func.count(SampleResult.flip_rate), func.count(SampleResult.tie), as_int(SampleResult.tie),
                   func.count(SampleResult.output),
                   func.sum(case((and_(SampleResult.output.is_not(None), SampleResult.extracted.is_(None)), 1),
                                 else_=0)),
                   func.count(SampleResult.error))
            .where(SampleResult.run_id.in_(run_ids)).group_by(SampleResult.run_id))
    for (run_id, n, n_c, k_c, n_cn, k_cn, tok, lat, flip, n_flip, n_mc, ties, n_gen,
         unparsed, n_err) in session.execute(stmt):
        m = metrics[run_id]
        m["n"] = (float(n), None, n)
        if n_err:  # samples without a result (over budget, evaluation raised): not in acc / acc_norm
            m["errors"] = (float(n_err), None, n)
        if n_c:
            p = k_c / n_c
            m["acc"] = (p, proportion_stderr(p, n_c), n_c)
        if n_cn:
            p = k_cn / n_cn
            m["acc_norm"] = (p, proportion_stderr(p, n_cn), n_cn)
        m["tokens"] = (float(tok) if tok is not None else None, None, n)
        m["latency_s"] = (float(lat) if lat is not None else None, None, n)
        if n_flip:
            m["flip_rate"] = (float(flip), None, n_flip)
        if n_mc:  # samples decided by the all -inf tie-break, out of the MC samples
            m["ties"] = (float(ties or 0), None, n_mc)
        if n_gen:  # generated outputs with no extractable answer, out of the generated samples
            m["unparsed"] = (float(unparsed or 0), None, n_gen)


def _vs_ft(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Metric]]) -> None:
    """Fixed / broken counts against the `ft` run of the same job and the exact McNemar p-value, from one
    grouped join over every run at once (samples both runs scored, `correct` known on both sides). The ft runs
    are looked up first, so the join reads their rows by index rather than every job's ft rows."""
    ft_run = aliased(Run)
    ft_ids = sorted(set(session.scalars(
        select(ft_run.id).join(Run, and_(ft_run.job_id == Run.job_id, ft_run.strategy == "ft", ft_run.id != Run.id))
        .where(Run.id.in_(run_ids)))))
    if not ft_ids:
        return
    a, b = aliased(SampleResult), aliased(SampleResult)
    stmt = (select(a.run_id, a.correct, b.correct, func.count())
            .join(Run, Run.id == a.run_id)
            .join(ft_run, and_(ft_run.job_id == Run.job_id, ft_run.strategy == "ft", ft_run.id != Run.id))
            .join(b, and_(b.run_id == ft_run.id, b.sample_index == a.sample_index))
            .where(a.run_id.in_(run_ids), b.run_id.in_(ft_ids), a.correct.is_not(None), b.correct.is_not(None))
            .group_by(a.run_id, a.correct, b.correct))
    counts: dict[int, dict[tuple[bool, bool], int]] = {}
    for run_id, x, y, n in session.execute(stmt):
        counts.setdefault(run_id, {})[(bool(x), bool(y))] = int(n)
    for run_id, c in counts.items():
        fixed, broken = c.get((True, False), 0), c.get((False, True), 0)
        n = sum(c.values())
        m = metrics[run_id]
        m["fixed_vs_ft"] = (float(fixed), None, n)
        m["broken_vs_ft"] = (float(broken), None, n)
        m["mcnemar_p_vs_ft"] = (mcnemar_p(fixed, broken), None, n)


def _kv_means(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Metric]]) -> None:
    """`kv.<key>`: the mean of each scalar kv statistic per run, averaged by the database."""
    dialect = session.get_bind().dialect.name
    if dialect not in _KV_MEANS:
        raise NotImplementedError(f"kv aggregates for the {dialect} dialect (supported: postgresql, sqlite)")
    stmt = text(_KV_MEANS[dialect]).bindparams(bindparam("run_ids", expanding=True))
    for run_id, key, mean, n in session.execute(stmt, {"run_ids": run_ids}):
        metrics[run_id][f"kv.{key}"] = (float(mean), None, int(n))


def refresh_aggregates(session: Session, run_ids: Iterable[int]) -> None:
    """Recompute each run's aggregates from its stored rows, in the database (acc, acc_norm, tokens, latency,
    flip rate, ties, unparsed, errors, fixed/broken and McNemar p vs the job's `ft` run, mean kv statistics)."""
    run_ids = list(run_ids)
    if not run_ids:
        return
    metrics: dict[int, dict[str, Metric]] = {r: {} for r in run_ids}
    count_metrics(session, run_ids, metrics)
    _vs_ft(session, run_ids, metrics)
    _kv_means(session, run_ids, metrics)
    write_metrics(session, metrics)


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
