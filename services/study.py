"""The protocol study's tables: multi-task adapters (one per train size) x datasets x strategies, from the DB.

A study cell is the newest run of (adapter, dataset, strategy) among finished (`done`) jobs of one base model in
one prompt format
whose adapter was trained on a mixture (`tad train --datasets ...`, manifest `mixture`). Per train size the
8-set average is the macro average of the per-set accuracies (as papers report it), its stderr from the per-set
stderrs; its McNemar test pools the discordant pairs of every set (the sets' samples are disjoint) and is
Holm-adjusted over the strategies of that train size. Used by `bench/study_protocol.py` and the dashboard.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from services.db import store
from tad_core.metrics import holm, macro_average_stderr, mcnemar_p

AVERAGE = "average"


@dataclass(frozen=True)
class StudyCell:
    """One strategy on one dataset (or the average over datasets) for one adapter."""

    train_size: int  # samples per set the adapter was trained on
    adapter: str
    dataset: str
    strategy: str
    acc: float | None
    stderr: float | None
    n: int
    unparsed: int
    fixed: int | None
    broken: int | None
    p: float | None
    p_holm: float | None
    final_loss: float | None = None


def study_cells(session: Session, *, base: str, fmt: str, limit: int = 5000) -> list[StudyCell]:
    """Per-set cells plus one `average` cell per (adapter, strategy) covering the sets it has."""
    adapters = {a.label: a for a in store.list_adapters(session) if a.manifest.get("mixture")}
    seen: set[tuple[str, str, str]] = set()
    cells: list[StudyCell] = []
    for r in store.leaderboard(session, limit=limit):  # newest job first
        variant = r.variant.split(",") if r.variant else []
        ad = adapters.get(r.adapter or "")
        if (r.base != base or fmt not in variant or ad is None or r.job_status != "done"
                or (r.adapter, r.dataset, r.key) in seen):
            continue
        seen.add((r.adapter, r.dataset, r.key))
        unparsed = r.metrics.get("unparsed")
        cells.append(StudyCell(int(ad.manifest.get("train_size_per_dataset", 0)), r.adapter, r.dataset, r.key,
                               r.acc, r.acc_stderr, r.n, int(unparsed or 0), r.fixed, r.broken, r.mcnemar_p,
                               r.mcnemar_p_holm, ad.manifest.get("mean_loss_last_10")))
    return cells + _averages(cells)


def study_formats(session: Session, limit: int = 5000) -> list[tuple[str, str]]:
    """(base, format) pairs with runs of a mixture-trained adapter under a non-default prompt format."""
    from tad_core.formats import REGISTRY

    mixture = {a.label for a in store.list_adapters(session) if a.manifest.get("mixture")}
    found: dict[tuple[str, str], None] = {}
    for r in store.leaderboard(session, limit=limit):
        if r.adapter in mixture:
            for part in (r.variant.split(",") if r.variant else []):
                if part.partition("@")[0] in REGISTRY:
                    found[(r.base, part)] = None
    return list(found)


def _averages(cells: Sequence[StudyCell]) -> list[StudyCell]:
    groups: dict[tuple[int, str, str], list[StudyCell]] = {}
    for c in cells:
        groups.setdefault((c.train_size, c.adapter, c.strategy), []).append(c)
    out: list[StudyCell] = []
    for (size, adapter, strategy), cs in groups.items():
        accs = [c.acc for c in cs if c.acc is not None]
        ses = [c.stderr or 0.0 for c in cs if c.acc is not None]
        fixed = sum(c.fixed or 0 for c in cs) if any(c.fixed is not None for c in cs) else None
        broken = sum(c.broken or 0 for c in cs) if fixed is not None else None
        out.append(StudyCell(size, adapter, AVERAGE, strategy, sum(accs) / len(accs) if accs else None,
                             macro_average_stderr(ses),
                             sum(c.n for c in cs), sum(c.unparsed for c in cs), fixed, broken,
                             mcnemar_p(fixed, broken) if fixed is not None else None, None,
                             cs[0].final_loss))
    by_adapter: dict[str, list[int]] = {}
    for i, c in enumerate(out):
        by_adapter.setdefault(c.adapter, []).append(i)
    for idx in by_adapter.values():  # Holm over the comparisons with ft of one adapter's averages
        for i, adj in zip(idx, holm([out[i].p for i in idx])):
            c = out[i]
            out[i] = StudyCell(c.train_size, c.adapter, c.dataset, c.strategy, c.acc, c.stderr, c.n, c.unparsed,
                               c.fixed, c.broken, c.p, adj, c.final_loss)
    return out


def _cell_text(c: StudyCell) -> str:
    if c.acc is None:
        return "-"
    return f"{c.acc:.3f} ± {c.stderr or 0:.3f}"


def markdown_tables(cells: Sequence[StudyCell], sets: Sequence[str]) -> list[str]:
    """One table per train size: strategies x (sets, average), then the average's statistics."""
    lines: list[str] = []
    for size in sorted({c.train_size for c in cells}):
        mine = [c for c in cells if c.train_size == size]
        adapter = mine[0].adapter
        strategies = sorted({c.strategy for c in mine}, key=lambda k: (k != "ft", k != "base", k))
        get = {(c.dataset, c.strategy): c for c in mine}
        loss = mine[0].final_loss
        lines += [f"**train size {size} per set ({adapter}; mean loss of the last 10 steps "
                  f"{loss:.3f})**" if loss is not None else f"**train size {size} per set ({adapter})**", "",
                  "| strategy | " + " | ".join(sets) + " | average | n | unparsed | fixed/broken vs ft | "
                  "McNemar p | Holm p |",
                  "|---|" + "---|" * (len(sets) + 6)]
        for k in strategies:
            avg = get.get((AVERAGE, k))
            row = [_cell_text(get[(d, k)]) if (d, k) in get else "-" for d in sets]
            stats = ["-"] * 6
            if avg is not None:
                rate = f"{avg.unparsed} ({100 * avg.unparsed / avg.n:.1f}%)" if avg.n else "-"
                vs = f"{avg.fixed}/{avg.broken}" if avg.fixed is not None and k != "ft" else "-"
                stats = [_cell_text(avg), str(avg.n), rate, vs,
                         "-" if avg.p is None or k == "ft" else f"{avg.p:.2g}",
                         "-" if avg.p_holm is None or k == "ft" else f"{avg.p_holm:.2g}"]
            lines.append(f"| {k} | " + " | ".join(row) + " | " + " | ".join(stats) + " |")
        lines.append("")
    return lines
