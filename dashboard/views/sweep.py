"""Alpha sweep: accuracy vs alpha for `tad` and `tad_log` (one line per strategy and beta) on one dataset and
model, with a ± stderr band and the fine-tuned model (`ft`) as a horizontal reference."""
from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.views.common import all_runs, model_label, pick_dataset
from services.db.store import with_variant
from services.db.views import RunRow

SWEPT = ("tad", "tad_log")


def sweep_frame(rows: Sequence[RunRow], metric: str = "acc") -> tuple[pd.DataFrame, RunRow | None]:
    """Points of the sweep (newest run per strategy/beta/alpha) and the newest `ft` run, all from finished (`done`)
    jobs on the sample count of the newest swept run: a later 5-sample job's points and ft (or a running job's
    first shards) were mixed into a 20-sample sweep, and its dashed ft line drawn from another slice."""
    done = [r for r in rows if r.job_status == "done"]
    anchor = next((r for r in done if r.strategy in SWEPT and "alpha" in r.params), None)
    rows = [r for r in done if anchor is not None and r.n == anchor.n]
    records, seen = [], set()
    for r in rows:  # newest job first
        value, se = (r.acc, r.acc_stderr) if metric == "acc" else (r.acc_norm, r.acc_norm_stderr)
        if r.strategy not in SWEPT or "alpha" not in r.params or value is None:
            continue
        alpha, beta = float(r.params["alpha"]), r.params.get("beta")
        series = with_variant(f"{r.strategy} (beta={beta})" if beta is not None else r.strategy, r.variant)
        if (series, alpha) in seen:
            continue
        seen.add((series, alpha))
        se = se or 0.0
        records.append({"series": series, "strategy": r.strategy, "alpha": alpha, "acc": value, "stderr": se,
                        "low": value - se, "high": value + se, "n": r.n, "run_id": r.run_id, "job_id": r.job_id})
    df = pd.DataFrame.from_records(records, columns=["series", "strategy", "alpha", "acc", "stderr", "low", "high",
                                                     "n", "run_id", "job_id"])
    ft = next((r for r in rows if r.strategy == "ft" and (r.acc if metric == "acc" else r.acc_norm) is not None),
              None)
    return df.sort_values(["series", "alpha"]).reset_index(drop=True), ft


def chart(df: pd.DataFrame, ft: RunRow | None, metric: str) -> alt.LayerChart:
    x = alt.X("alpha:Q", title="alpha")
    color = alt.Color("series:N", title="strategy")
    band = alt.Chart(df).mark_area(opacity=0.18).encode(x=x, y=alt.Y("low:Q", title=metric), y2="high:Q",
                                                        color=color)
    line = alt.Chart(df).mark_line(point=True).encode(
        x=x, y=alt.Y("acc:Q", title=metric, scale=alt.Scale(zero=False)), color=color,
        tooltip=["series", "alpha", alt.Tooltip("acc:Q", format=".4f"), alt.Tooltip("stderr:Q", format=".4f"),
                 "n", "run_id"])
    layers: list[alt.Chart] = [band, line]
    if ft is not None:
        value, se = (ft.acc, ft.acc_stderr) if metric == "acc" else (ft.acc_norm, ft.acc_norm_stderr)
        se = se or 0.0
        ref = pd.DataFrame({"label": [f"ft {value:.4f}"], "acc": [value], "low": [value - se], "high": [value + se]})
        layers.append(alt.Chart(ref).mark_rect(opacity=0.08, color="gray").encode(y="low:Q", y2="high:Q"))
        layers.append(alt.Chart(ref).mark_rule(strokeDash=[6, 4], color="gray").encode(
            y="acc:Q", tooltip=["label"]))
    return alt.layer(*layers).properties(height=380)


def render() -> None:
    st.title("Alpha sweep")
    url = data.database_url()
    rows = [r for r in all_runs(url) if r.n > 0]
    swept = [r for r in rows if r.strategy in SWEPT and "alpha" in r.params]
    if not swept:
        st.info("No TaD runs yet: sweep alpha with `tad run --dataset ... --strategy ft "
                "--strategy tad:alpha=0.25,0.5,1,2 --strategy tad_log:alpha=0.25,0.5,1`.")
        return
    ds_id, ds_runs = pick_dataset(swept, key="sw_dataset")
    models = list(dict.fromkeys(model_label(r.base, r.adapter_label) for r in ds_runs))
    c1, c2 = st.columns([3, 1])
    model = c1.selectbox("Model", models, key="sw_model")
    metric = c2.radio("Metric", ["acc", "acc_norm"], horizontal=True, key="sw_metric")
    same = [r for r in rows if r.dataset_id == ds_id and model_label(r.base, r.adapter_label) == model]
    df, ft = sweep_frame(same, metric)
    if df.empty:
        st.info(f"No {metric} values for this selection.")
        return
    st.altair_chart(chart(df, ft, metric), width="stretch")
    ft_text = f"ft = {ft.acc if metric == 'acc' else ft.acc_norm:.4f} (run {ft.run_id})" if ft else "no ft run"
    best = df.loc[df["acc"].idxmax()]
    st.caption(f"Band: ± 1 stderr. Dashed line: {ft_text}. Best: {best['series']} at alpha={best['alpha']:g} "
               f"({best['acc']:.4f}).")
    st.dataframe(df.drop(columns=["low", "high"]), hide_index=True, width="stretch")
