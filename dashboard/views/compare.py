"""Run comparison: two runs on the same dataset, paired by sample. Accuracy difference with its exact interval
(which agrees with the test) and the exact McNemar p-value (tad_core.metrics.mcnemar), the contingency table, and the
samples one run fixed or broke relative to the other."""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.views.common import all_runs, choice_text, gold_text, pick_dataset, prompt_text, run_label
from services.db.views import RunRow
from tad_core.metrics import McNemarResult, mcnemar

CHANGE_FILTERS = {"fixed and broken": ("fixed", "broken"), "fixed (A wrong, B right)": ("fixed",),
                  "broken (A right, B wrong)": ("broken",)}


def default_pair(rows: Sequence[RunRow]) -> tuple[int, int]:
    """Indices of the default (A, B): the newest `ft` run and another run of the same job (TaD when there is one)."""
    ft = next((i for i, r in enumerate(rows) if r.strategy == "ft"), 0)
    same_job = [i for i, r in enumerate(rows) if r.job_id == rows[ft].job_id and i != ft]
    tad = [i for i in same_job if rows[i].strategy == "tad"]
    others = [i for i in range(len(rows)) if i != ft]
    b = (tad or same_job or others or [ft])[0]
    return ft, b


def contingency(res: McNemarResult) -> pd.DataFrame:
    return pd.DataFrame({"B right": [res.both_right, res.fixed], "B wrong": [res.broken, res.both_wrong]},
                        index=["A right", "A wrong"])


def sample_table(url: str, a: RunRow, b: RunRow, kinds: tuple[str, ...], limit: int) -> pd.DataFrame:
    diff = data.run_diff(url, a.run_id, b.run_id, limit=limit, changes=tuple(kinds))
    rows = diff.rows
    samples = data.samples_at(url, a.dataset_id, tuple(r.sample_index for r in rows))
    records = []
    for r in rows:
        change = "fixed" if r.b_correct else "broken"
        s = samples.get(r.sample_index)
        records.append({
            "sample": r.sample_index, "id": r.sample_id, "change": change, "prompt": prompt_text(s),
            "A answer": r.a_output if r.a_output is not None else choice_text(s, r.a_pred),
            "B answer": r.b_output if r.b_output is not None else choice_text(s, r.b_pred),
            "gold": gold_text(s)})
    return pd.DataFrame.from_records(records, columns=["sample", "id", "change", "prompt", "A answer", "B answer",
                                                       "gold"])


def render() -> None:
    st.title("Run comparison")
    url = data.database_url()
    rows = all_runs(url)
    ds_id, ds_runs = pick_dataset(rows, key="cmp_dataset")
    ds_runs = [r for r in ds_runs if r.n > 0]
    if len(ds_runs) < 2:
        st.info("This dataset has a single run: evaluate another strategy or model on it to compare.")
        return
    a_default, b_default = default_pair(ds_runs)
    labels = {r.run_id: run_label(r) for r in ds_runs}
    ids = [r.run_id for r in ds_runs]
    c1, c2 = st.columns(2)
    a_id = c1.selectbox("Run A (reference)", ids, index=a_default, format_func=labels.__getitem__, key="cmp_a")
    b_id = c2.selectbox("Run B (candidate)", ids, index=b_default, format_func=labels.__getitem__, key="cmp_b")
    a = next(r for r in ds_runs if r.run_id == a_id)
    b = next(r for r in ds_runs if r.run_id == b_id)
    if a_id == b_id:
        st.warning("Pick two different runs.")
        return
    level = st.select_slider("Confidence level", [0.8, 0.9, 0.95, 0.99], value=0.95, key="cmp_level")
    pairs = data.paired(url, a_id, b_id)
    if not pairs:
        st.info("These runs share no scored samples (no per-sample correctness stored for both).")
        return
    res = mcnemar([p.a_correct for p in pairs], [p.b_correct for p in pairs], level=level)
    n = len(pairs)
    acc_a = sum(p.a_correct for p in pairs) / n
    acc_b = sum(p.b_correct for p in pairs) / n
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("acc A", f"{acc_a:.4f}", help=f"{a.label} on the {n} paired samples")
    m2.metric("acc B", f"{acc_b:.4f}", help=f"{b.label} on the {n} paired samples")
    m3.metric("acc B − A", f"{res.diff:+.4f}", help=f"{level:.0%} exact interval (agrees with McNemar's p)")
    m4.metric("McNemar p", f"{res.p_value:.4g}", help="exact two-sided McNemar test on the discordant pairs")
    st.markdown(f"**Difference** {res.diff:+.4f}, {level:.0%} CI [{res.diff_ci_low:+.4f}, {res.diff_ci_high:+.4f}]"
                f" · **McNemar p** = {res.p_value:.4g} · **n** = {n} paired samples · "
                f"B fixed {res.fixed}, broke {res.broken}")
    left, right = st.columns([1, 2])
    with left:
        st.subheader("Contingency")
        st.table(contingency(res))
        st.caption(f"both right {res.both_right} · fixed {res.fixed} · broken {res.broken} · "
                   f"both wrong {res.both_wrong}")
    with right:
        st.subheader("Changed samples")
        choice = st.radio("Show", list(CHANGE_FILTERS), horizontal=True, key="cmp_filter")
        limit = st.number_input("At most", min_value=10, max_value=5000, value=200, step=50, key="cmp_limit")
        table = sample_table(url, a, b, CHANGE_FILTERS[choice], int(limit))
        if table.empty:
            st.info("No sample changed in this direction.")
        else:
            st.dataframe(table, hide_index=True, width="stretch",
                         column_config={"prompt": st.column_config.TextColumn(width="medium")})
