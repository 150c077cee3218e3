"""Leaderboard: rows = (base model, adapter:version, strategy with parameters), columns = datasets,
cells = accuracy ± stderr (n); the best cell of each column is marked ★, and ▲ / ▼ mark a run significantly better
/ worse than `ft` of the same job (exact McNemar, Holm-adjusted over the job's comparisons, p < 0.05)."""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.views.common import NO_RUNS, md
from services.db.store import LeaderboardRow

ROW_KEYS = ["base", "adapter", "strategy"]
STAR = " ★"
SIGNIFICANT = 0.05


def vs_ft_mark(r: LeaderboardRow) -> str:
    """▲ / ▼ when the run differs from its job's ft on `acc` after Holm's correction (p < 0.05), else ""."""
    if r.mcnemar_p_holm is None or r.mcnemar_p_holm >= SIGNIFICANT or r.fixed is None or r.fixed == r.broken:
        return ""
    return "▲" if r.fixed > r.broken else "▼"


def long_frame(rows: Sequence[LeaderboardRow], metric: str = "acc") -> pd.DataFrame:
    """One row per run: model, strategy, dataset and the metric's value / stderr / n (numbers, not text)."""
    records = []
    for r in rows:
        value, se = (r.acc, r.acc_stderr) if metric == "acc" else (r.acc_norm, r.acc_norm_stderr)
        adapter = r.adapter or "–"
        records.append({
            "base": r.base, "adapter": adapter, "family": adapter.split(":")[0] if r.adapter else "–",
            "strategy": r.label, "strategy_name": r.strategy, "dataset": f"{r.dataset}:{r.split}",
            "value": value, "stderr": se, "n": r.n, "job_id": r.job_id, "run_id": r.run_id,
            "job_status": r.job_status, "holm_p_vs_ft": r.mcnemar_p_holm,
            "vs_ft": vs_ft_mark(r) if metric == "acc" else "",  # the paired tests are on acc
            "ties": r.metrics.get("ties"), "unparsed": r.metrics.get("unparsed")})
    cols = ["base", "adapter", "family", "strategy", "strategy_name", "dataset", "value", "stderr", "n", "job_id",
            "run_id", "job_status", "holm_p_vs_ft", "vs_ft", "ties", "unparsed"]
    return pd.DataFrame.from_records(records, columns=cols)


def latest_per_cell(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the newest job's run for each (model, strategy, dataset) cell."""
    return df.sort_values("job_id", ascending=False).drop_duplicates(ROW_KEYS + ["dataset"], keep="first")


def cell_text(value: float | None, se: float | None, n: int, mark: str = "", ties: float | None = None,
              unparsed: float | None = None) -> str:
    """`0.6230 ± 0.0280 (n=300, 12 ties)`: ties (MC samples where every choice was -inf, decided by the tie-break)
    and unparsed generations are named in the cell whenever there are any, since they qualify the accuracy."""
    extra = "".join(f", {int(k)} {word}" for k, word in ((ties, "ties"), (unparsed, "unparsed"))
                    if k is not None and not pd.isna(k) and k > 0)
    if value is None or pd.isna(value):
        return f"– (n={n}{extra})"
    se_text = f" ± {se:.4f}" if se is not None and not pd.isna(se) else ""
    return f"{value:.4f}{se_text} (n={n}{extra})" + (f" {mark}" if mark else "")


def wide_table(df: pd.DataFrame, sort_by: str | None = None) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """The leaderboard table (text cells, best per column marked) and, per dataset, the row positions of its
    best cells (for highlighting). `sort_by`: a dataset column or "mean" (descending), else model order."""
    datasets = sorted(df["dataset"].unique())
    values = df.set_index(ROW_KEYS + ["dataset"])["value"].astype(float).unstack("dataset")
    values = values.reindex(columns=datasets)
    values["mean"] = values[datasets].mean(axis=1)
    key = sort_by if sort_by in values.columns else None
    values = values.sort_values(key, ascending=False, na_position="last") if key else values.sort_index()
    text = pd.DataFrame(index=values.index)
    by_cell = {(row.base, row.adapter, row.strategy, row.dataset): row for row in df.itertuples()}
    best: dict[str, list[int]] = {}
    for ds in datasets:
        col = values[ds]
        top = col.max()
        best[ds] = [i for i, v in enumerate(col) if pd.notna(v) and v == top]
        cells = []
        for i, idx in enumerate(values.index):
            row = by_cell.get((*idx, ds))
            if row is None:
                cells.append("")
                continue
            cells.append(cell_text(row.value, row.stderr, row.n, row.vs_ft, row.ties, row.unparsed)
                         + (STAR if i in best[ds] else ""))
        text[ds] = cells
    text["mean"] = [f"{v:.4f}" if pd.notna(v) else "" for v in values["mean"]]
    return text.reset_index(), best


def best_summary(df: pd.DataFrame) -> list[str]:
    """"dataset: model · strategy (value)" for the best run of each dataset (ties listed together)."""
    out = []
    for ds, group in sorted(df.dropna(subset=["value"]).groupby("dataset"), key=lambda kv: kv[0]):
        top = group["value"].max()
        winners = group[group["value"] == top]
        who = ", ".join(f"{r.adapter if r.adapter != '–' else r.base} {r.strategy}" for r in winners.itertuples())
        out.append(f"{md(ds)}: {md(who)} ({top:.4f})")
    return out


def render() -> None:
    st.title("Leaderboard")
    url = data.database_url()
    rows = data.leaderboard(url)
    if not rows:
        st.info(NO_RUNS, icon=":material/hourglass_empty:")
        return
    metric = st.radio("Metric", ["acc", "acc_norm"], horizontal=True, key="lb_metric",
                      help="acc: argmax of summed log-likelihood; acc_norm: per continuation character "
                           "(multiple choice only)")
    df = long_frame(rows, metric)
    c1, c2, c3, c4 = st.columns(4)
    pick_ds = c1.multiselect("Datasets", sorted(df["dataset"].unique()), key="lb_ds", placeholder="all")
    pick_base = c2.multiselect("Base models", sorted(df["base"].unique()), key="lb_base", placeholder="all")
    pick_family = c3.multiselect("Adapter families", sorted(df["family"].unique()), key="lb_family",
                                 placeholder="all")
    pick_strat = c4.multiselect("Strategies", sorted(df["strategy_name"].unique()), key="lb_strat",
                                placeholder="all")
    statuses = sorted(df["job_status"].unique())
    # finished jobs by default: a running job's partial run (its first shards) replaced the finished run of its
    # cell and could take the column's star
    pick_status = st.multiselect("Job status", statuses, default=[s for s in statuses if s in ("done", "partial")]
                                 or statuses, key="lb_status",
                                 help="add `running` to see jobs still being evaluated (their first shards only)")
    for col, picked in (("dataset", pick_ds), ("base", pick_base), ("family", pick_family),
                        ("strategy_name", pick_strat), ("job_status", pick_status)):
        if picked:
            df = df[df[col].isin(picked)]
    df = latest_per_cell(df)
    if df.empty:
        st.warning("No runs match these filters.")
        return
    sort_options = ["model", "mean", *sorted(df["dataset"].unique())]
    sort_by = st.selectbox("Sort rows by", sort_options, index=1, key="lb_sort",
                           help="the table is also sortable by clicking a column header")
    table, best = wide_table(df, sort_by)

    def _highlight(col: pd.Series) -> list[str]:
        marks = set(best.get(str(col.name), []))
        return ["font-weight: bold; background-color: rgba(33, 195, 84, 0.18)" if i in marks else ""
                for i in range(len(col))]

    st.caption(f"{metric} ± stderr (n) of the newest run per cell; ★ = best in the column; ties = MC samples "
               "where every choice was -inf (decided by the tie-break to choice 0); unparsed = generated outputs "
               "with no extractable answer"
               + ("; ▲ / ▼ = significantly better / worse than ft of the same job (exact McNemar, Holm-adjusted "
                  "over the job's comparisons, p < 0.05)" if metric == "acc" else "")
               + f". {len(df)} runs, {df['job_id'].nunique()} jobs.")
    st.dataframe(table.style.apply(_highlight, axis=0), hide_index=True, width="stretch",
                 column_config={ds: st.column_config.TextColumn(ds, width="medium") for ds in best})
    st.markdown("**Best per dataset** · " + " · ".join(best_summary(df)))
    export = df.drop(columns=["strategy_name"]).rename(columns={"value": metric, "stderr": f"{metric}_stderr"})
    st.download_button("Download CSV", export.to_csv(index=False).encode(), file_name="tad_leaderboard.csv",
                       mime="text/csv", icon=":material/download:")
