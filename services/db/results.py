"""Results store: per-sample rows (upserted per batch), run aggregates, the leaderboard and the run diff (the
dashboard's two hot queries). Functions of a Session returning plain types (services.db.entities)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, case, false, func, or_, select
from sqlalchemy.orm import Session, aliased

from tad_core.metrics import mcnemar_p, proportion_stderr

from services.db.aggregates import Metric, write_metrics
from services.db.dialect import dialect_insert as _dialect_insert
from services.db.entities import RESULT_COLUMNS, DiffRow, LeaderboardRow, RunDiff
from services.db.kv_stats import scalar_kv_stats
from services.db.models import Adapter, BaseModel, Dataset, Job, Run, RunAggregate, SampleResult, utcnow
from services.db.naming import scoring_variant


def upsert_sample_results(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert or replace per-sample rows keyed by (run_id, sample_index); returns the number of rows written."""
    if not rows:
        return 0
    now = utcnow()
    values = [{"run_id": r["run_id"], "sample_index": r["sample_index"], "created_at": now,
               **{c: r.get(c) for c in RESULT_COLUMNS}} for r in rows]
    for v in values:
        v["latency_s"] = v["latency_s"] or 0.0
        v["tokens"] = v["tokens"] or 0
    ins = _dialect_insert(session, SampleResult)
    stmt = ins.on_conflict_do_update(
        index_elements=[SampleResult.run_id, SampleResult.sample_index],
        set_={c: getattr(ins.excluded, c) for c in (*RESULT_COLUMNS, "created_at")},
    )
    session.execute(stmt, values)
    return len(values)


def refresh_aggregates(session: Session, run_ids: Iterable[int]) -> None:
    """Recompute each run's aggregates from all its stored rows (acc, acc_norm, tokens, latency, flip rate,
    fixed/broken and McNemar p vs the job's `ft` run, mean scalar kv statistics).

    The reference implementation: it reads every row (and decodes every kv JSON in Python) at each refresh. The
    service refreshes from per-shard partial sums (services.db.aggregates), whose numbers tests and
    bench/bench_aggregates.py compare with these."""
    run_ids = list(run_ids)
    if not run_ids:
        return
    metrics: dict[int, dict[str, Metric]] = {r: {} for r in run_ids}
    _count_metrics(session, run_ids, metrics)
    _vs_ft_aggregates(session, run_ids, metrics)
    _kv_aggregates(session, run_ids, metrics)
    write_metrics(session, metrics)


def _count_metrics(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Metric]]) -> None:
    """Accuracy with its stderr, mean tokens / latency / flip rate, ties, unparsed outputs and error rows (one
    grouped query over every row of the runs)."""
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


def _vs_ft_aggregates(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Any]]) -> None:
    """Paired counts against the `ft` run of the same job and the exact McNemar p-value."""
    ft = aliased(Run)
    pairs = dict(session.execute(select(Run.id, ft.id).join(ft, and_(ft.job_id == Run.job_id, ft.strategy == "ft"))
                                 .where(Run.id.in_(run_ids), Run.id != ft.id)).all())
    for run_id, ft_id in pairs.items():
        summary = _paired_counts(session, run_id, ft_id)
        if summary is None:
            continue
        both_right, fixed, broken, both_wrong = summary
        n = both_right + fixed + broken + both_wrong
        m = metrics[run_id]
        m["fixed_vs_ft"] = (float(fixed), None, n)
        m["broken_vs_ft"] = (float(broken), None, n)
        m["mcnemar_p_vs_ft"] = (mcnemar_p(fixed, broken), None, n)


def _paired_counts(session: Session, run_a: int, run_b: int) -> tuple[int, int, int, int] | None:
    """(both right, a right only, b right only, both wrong) over samples both runs scored."""
    a, b = aliased(SampleResult), aliased(SampleResult)
    stmt = (select(a.correct, b.correct, func.count())
            .join(b, and_(b.run_id == run_b, b.sample_index == a.sample_index))
            .where(a.run_id == run_a, a.correct.is_not(None), b.correct.is_not(None))
            .group_by(a.correct, b.correct))
    counts = {(bool(x), bool(y)): int(n) for x, y, n in session.execute(stmt)}
    if not counts:
        return None
    return counts.get((True, True), 0), counts.get((True, False), 0), counts.get((False, True), 0), counts.get((False, False), 0)


def _kv_aggregates(session: Session, run_ids: list[int], metrics: dict[int, dict[str, Any]]) -> None:
    """Mean of each scalar kv statistic per run (kv dicts may also hold lists, e.g. top-k ids: skipped)."""
    sums: dict[int, dict[str, list[float]]] = {r: {} for r in run_ids}
    for run_id, kv in session.execute(select(SampleResult.run_id, SampleResult.kv)
                                      .where(SampleResult.run_id.in_(run_ids), SampleResult.kv.is_not(None))):
        for k, v in scalar_kv_stats(kv).items():
            acc = sums[run_id].setdefault(k, [0.0, 0.0])
            acc[0] += v
            acc[1] += 1
    for run_id, stats in sums.items():
        for k, (total, n) in stats.items():
            metrics[run_id][f"kv.{k}"] = (total / n, None, int(n))


def run_aggregates(session: Session, run_id: int) -> dict[str, tuple[float | None, float | None, int]]:
    return {m: (v, se, n) for m, v, se, n in session.execute(
        select(RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n)
        .where(RunAggregate.run_id == run_id))}


def sample_rows(session: Session, run_id: int, start: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Stored per-sample rows of one run as dicts (column name -> value), in sample order."""
    stmt = (select(SampleResult).where(SampleResult.run_id == run_id, SampleResult.sample_index >= start)
            .order_by(SampleResult.sample_index))
    if limit is not None:
        stmt = stmt.limit(limit)
    return [{"run_id": r.run_id, "sample_index": r.sample_index, **{c: getattr(r, c) for c in RESULT_COLUMNS}}
            for r in session.scalars(stmt)]


def stored_sample_indices(session: Session, run_ids: Sequence[int], start: int, stop: int) -> set[int]:
    """Sample indices in [start, stop) that have a row in every one of `run_ids` (an earlier attempt stored
    them; a resumed shard skips them)."""
    if not run_ids:
        return set()
    stmt = (select(SampleResult.sample_index)
            .where(SampleResult.run_id.in_(list(run_ids)), SampleResult.sample_index >= start,
                   SampleResult.sample_index < stop)
            .group_by(SampleResult.sample_index)
            .having(func.count(func.distinct(SampleResult.run_id)) == len(set(run_ids))))
    return set(session.scalars(stmt))


def count_sample_rows(session: Session, run_ids: Sequence[int]) -> int:
    return int(session.scalar(select(func.count()).select_from(SampleResult).where(SampleResult.run_id.in_(run_ids))) or 0)


def leaderboard(
    session: Session,
    *,
    job_ids: Sequence[int] | None = None,
    dataset_id: int | None = None,
    limit: int = 500,
) -> list[LeaderboardRow]:
    """One row per run with its aggregates, best accuracy first. Reads only runs + run_aggregates."""
    stmt = (select(Run, Job.status, Dataset.name, Dataset.split, BaseModel.name, Adapter.name, Adapter.version,
                   Job.spec)
            .join(Job, Job.id == Run.job_id).join(Dataset, Dataset.id == Job.dataset_id)
            .join(BaseModel, BaseModel.id == Job.base_model_id).outerjoin(Adapter, Adapter.id == Job.adapter_id))
    if job_ids is not None:
        stmt = stmt.where(Run.job_id.in_(list(job_ids)))
    if dataset_id is not None:
        stmt = stmt.where(Job.dataset_id == dataset_id)
    meta = session.execute(stmt.order_by(Run.job_id.desc(), Run.id).limit(limit)).all()
    if not meta:
        return []
    aggs: dict[int, dict[str, tuple[float | None, float | None, int]]] = {}
    for run_id, metric, value, se, n in session.execute(
            select(RunAggregate.run_id, RunAggregate.metric, RunAggregate.value, RunAggregate.stderr, RunAggregate.n)
            .where(RunAggregate.run_id.in_([m[0].id for m in meta]))):
        aggs.setdefault(run_id, {})[metric] = (value, se, n)
    rows = []
    for run, status, ds, split, base, ad_name, ad_ver, spec in meta:
        a = aggs.get(run.id, {})
        get = lambda k, i=0: a[k][i] if k in a else None  # noqa: E731
        adapter = f"{ad_name}:{ad_ver}" if ad_name else (spec.get("finetuned") or None)
        n = int(a["n"][2]) if "n" in a else 0
        fixed, broken = get("fixed_vs_ft"), get("broken_vs_ft")
        rows.append(LeaderboardRow(
            job_id=run.job_id, run_id=run.id, job_status=status, dataset=ds, split=split, base=base, adapter=adapter,
            strategy=run.strategy, key=run.key, params=dict(run.params or {}), n=n,
            acc=get("acc"), acc_stderr=get("acc", 1), acc_norm=get("acc_norm"), acc_norm_stderr=get("acc_norm", 1),
            fixed=int(fixed) if fixed is not None else None, broken=int(broken) if broken is not None else None,
            mcnemar_p=get("mcnemar_p_vs_ft"), metrics={k: v[0] for k, v in a.items()}, info=dict(run.info or {}),
            variant=scoring_variant(spec)))
    rows = _with_holm(rows)
    rows.sort(key=lambda r: (-r.job_id, -(r.acc if r.acc is not None else -1.0), r.key))
    return rows


def _with_holm(rows: list[LeaderboardRow]) -> list[LeaderboardRow]:
    """Each row's McNemar p adjusted (Holm) over the comparisons with ft of its own job: one family per job."""
    from dataclasses import replace

    from tad_core.metrics import holm

    by_job: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_job.setdefault(r.job_id, []).append(i)
    out = list(rows)
    for idx in by_job.values():
        for i, adj in zip(idx, holm([rows[i].mcnemar_p for i in idx])):
            out[i] = replace(rows[i], mcnemar_p_holm=adj)
    return out


def run_diff(session: Session, run_a: int, run_b: int, *, only_changed: bool = True, limit: int = 200,
             changes: Sequence[str] | None = None) -> RunDiff:
    """Per-sample comparison of two runs over the samples both scored: counts, and the rows (changed ones only
    by default) in sample order. `changes` keeps only `fixed` (a wrong, b right) and / or `broken` rows, selected
    before the limit (filtered after it, a page of 10 could show none of 50 fixed samples)."""
    counts = _paired_counts(session, run_a, run_b) or (0, 0, 0, 0)
    a, b = aliased(SampleResult), aliased(SampleResult)
    stmt = (select(a.sample_index, a.sample_id, a.correct, b.correct, a.pred, b.pred, a.output, b.output)
            .join(b, and_(b.run_id == run_b, b.sample_index == a.sample_index)).where(a.run_id == run_a))
    if only_changed:
        stmt = stmt.where(a.correct.is_distinct_from(b.correct))
    if changes is not None:
        wanted = {"fixed": and_(a.correct.is_(False), b.correct.is_(True)),
                  "broken": and_(a.correct.is_(True), b.correct.is_(False))}
        stmt = stmt.where(or_(false(), *(wanted[c] for c in changes)))
    rows = [DiffRow(*r) for r in session.execute(stmt.order_by(a.sample_index).limit(limit))]
    return RunDiff(run_a, run_b, *counts, rows=rows)
