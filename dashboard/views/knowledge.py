"""Knowledge-vector views: per run, the distributions of KL(p_f || p_b), ||kv||_1 and the flip rate over samples;
for one generated sample, its tokens coloured by how much TaD changed them, and the most promoted / demoted
tokens of a chosen step (kv = p_f - p_b)."""
from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.views.common import all_runs, md, pick_dataset, run_label
from services.db.views import KvSampleRow

DISTRIBUTIONS = {"kl_mean": "KL(p_f ‖ p_b), mean over steps", "kv_l1_mean": "‖kv‖₁, mean over steps",
                 "flip_rate": "flip rate (share of steps where the strategy's choice ≠ ft's)"}
COLOUR_BY = {"kl": "KL(p_f ‖ p_b)", "flip": "flipped (TaD's token ≠ ft's argmax)", "kv_l1": "‖kv‖₁",
             "js": "Jensen-Shannon", "kv_max": "max |kv|"}


def kv_frame(rows: Sequence[KvSampleRow]) -> pd.DataFrame:
    records = [{"sample": r.sample_index, "id": r.sample_id,
                "outcome": "correct" if r.correct else ("wrong" if r.correct is False else "unscored"),
                "vs_ft": r.vs_ft or "same", "flip_rate": r.flip_rate,
                "kl_mean": r.stats.get("kl_mean"), "kv_l1_mean": r.stats.get("kv_l1_mean"),
                "tokens": r.tokens, "has_steps": r.has_steps} for r in rows]
    return pd.DataFrame.from_records(records, columns=["sample", "id", "outcome", "vs_ft", "flip_rate", "kl_mean",
                                                       "kv_l1_mean", "tokens", "has_steps"])


def histogram(df: pd.DataFrame, column: str, title: str) -> alt.Chart:
    return alt.Chart(df.dropna(subset=[column])).mark_bar(opacity=0.8).encode(
        x=alt.X(f"{column}:Q", bin=alt.Bin(maxbins=30), title=title),
        y=alt.Y("count():Q", title="samples", stack=True),
        color=alt.Color("outcome:N", scale=alt.Scale(domain=["correct", "wrong", "unscored"],
                                                     range=["#21c354", "#ff4b4b", "#999999"]),
                        legend=alt.Legend(orient="bottom")),
        tooltip=["outcome", "count()"]).properties(height=220)


def token_text(entry: dict[str, Any], tokenizer: Any | None) -> str:
    """The text of a step's token: stored text when present, decoded id when a tokenizer is at hand, else ⟨id⟩."""
    tok = entry.get("text", entry.get("token"))
    if isinstance(tok, str):
        return tok
    if tokenizer is not None and isinstance(tok, int):
        try:
            return tokenizer.decode([tok])
        except Exception:  # noqa: BLE001
            pass
    return f"⟨{tok}⟩"


def tokens_html(steps: Sequence[dict[str, Any]], texts: Sequence[str], by: str, selected: int | None) -> str:
    """Spans with a red background whose strength is the step's statistic (relative to the sample's maximum)."""
    if by == "flip":
        weights = [1.0 if s.get("flip") else 0.0 for s in steps]
    else:
        vals = [float(s.get(by) or 0.0) for s in steps]
        top = max(vals) if vals and max(vals) > 0 else 1.0
        weights = [v / top for v in vals]
    spans = []
    for i, (step, text, w) in enumerate(zip(steps, texts, weights)):
        border = "outline: 2px solid #1c83e1;" if i == selected else ""
        title = f"step {i}: " + ", ".join(f"{k}={step[k]}" for k in ("flip", "kl", "js", "kv_l1") if k in step)
        shown = html.escape(text).replace("\n", "↵<br>") or "∅"
        spans.append(f'<span title="{html.escape(title)}" style="background: rgba(255, 75, 75, {0.08 + 0.8 * w:.2f});'
                     f' border-radius: 3px; padding: 1px 2px; margin: 0 1px; {border}">{shown}</span>')
    return ('<div style="line-height: 2.1; font-family: monospace; font-size: 0.95rem;">' + "".join(spans)
            + "</div>")


def top_table(items: Sequence[Sequence[Any]] | None) -> pd.DataFrame:
    rows = [{"token": repr(t[0]), "id": t[1], "kv": t[2]} for t in (items or []) if len(t) >= 3]
    return pd.DataFrame.from_records(rows, columns=["token", "id", "kv"])


def render() -> None:
    st.title("Knowledge vectors")
    url = data.database_url()
    rows = [r for r in all_runs(url) if r.n > 0]
    if not rows:
        st.info("No run has stored results yet.")
        return
    ds_id, ds_runs = pick_dataset(rows, key="kv_dataset")
    paired = [r for r in ds_runs if r.strategy not in ("ft", "base")] or ds_runs
    labels = {r.run_id: run_label(r) for r in paired}
    run_id = st.selectbox("Run", list(labels), format_func=labels.__getitem__, key="kv_run")
    run = next(r for r in paired if r.run_id == run_id)
    df = kv_frame(data.kv_stats(url, run_id))
    if df.empty or (df["kl_mean"].isna().all() and df["flip_rate"].isna().all()):
        st.info("This run stored no knowledge-vector statistics (they come from strategies that use both the "
                "base and the fine-tuned model, e.g. tad).")
        return
    cols = st.columns(3)
    for col, (name, title) in zip(cols, DISTRIBUTIONS.items()):
        mean = df[name].mean()
        col.metric(f"mean {name}", "–" if pd.isna(mean) else f"{mean:.4f}")
        if df[name].notna().any():
            col.altair_chart(histogram(df, name, title), width="stretch")

    st.subheader("One sample")
    with_steps = df[df["has_steps"]]
    choices = (with_steps if not with_steps.empty else df)["sample"].tolist()
    ids = dict(zip(df["sample"], df["id"]))
    c1, c2 = st.columns([2, 2])
    sample_index = c1.selectbox("Sample", choices, format_func=lambda i: f"{i} ({ids[i]})", key="kv_sample")
    result = data.sample_result(url, run_id, int(sample_index)) or {}
    kv = result.get("kv") or {}
    steps = kv.get("per_step") or []
    sample = data.samples_at(url, ds_id, (int(sample_index),)).get(int(sample_index), {})
    st.caption(f"prompt: {md(sample.get('prompt', '–'))}")
    if not steps:
        st.info("No per-step statistics for this sample (multiple-choice samples store one knowledge vector over "
                "the answer tokens). Top tokens of that vector:")
        left, right = st.columns(2)
        left.markdown("**promoted** (p_f > p_b)")
        left.dataframe(top_table(kv.get("promoted")), hide_index=True)
        right.markdown("**demoted** (p_f < p_b)")
        right.dataframe(top_table(kv.get("demoted")), hide_index=True)
        return
    by = c2.radio("Colour by", list(COLOUR_BY), format_func=COLOUR_BY.__getitem__, horizontal=True, key="kv_by")
    tokenizer = data.tokenizer_for(data.job(url, run.job_id).spec.get("base") or run.base)
    texts = [token_text(s, tokenizer) for s in steps]
    step = st.slider("Step", 0, len(steps) - 1, 0, key="kv_step") if len(steps) > 1 else 0
    st.html(tokens_html(steps, texts, by, step))
    st.caption(f"output: {md(repr(result.get('output')))} · flip rate {result.get('flip_rate')} · "
               f"correct {result.get('correct')}")
    entry = steps[step]
    st.markdown(f"**Step {step}**: token {md(repr(texts[step]))} · flip {entry.get('flip')} · KL {entry.get('kl')} · "
                f"‖kv‖₁ {entry.get('kv_l1')}")
    left, right = st.columns(2)
    left.markdown("**promoted** (p_f > p_b)")
    left.dataframe(top_table(entry.get("promoted")), hide_index=True)
    right.markdown("**demoted** (p_f < p_b)")
    right.dataframe(top_table(entry.get("demoted")), hide_index=True)
