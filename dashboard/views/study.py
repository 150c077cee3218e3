"""Study: the published-protocol study (multi-task adapters at several train sizes x sets x strategies).

Per train size, each strategy's accuracy per set and averaged over the sets, with the unparsed rate and the paired
McNemar test against `ft` (pooled over the sets, Holm-adjusted over the strategies), and a chart of the average by
train size. The cells come from `services.study`, the same code that prints the tables of bench/RESULTS.md.
"""
from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data
from services.study import AVERAGE, StudyCell

COLUMNS = ["train_size", "adapter", "strategy", "dataset", "acc", "stderr", "n", "unparsed", "unparsed_rate",
           "fixed", "broken", "p", "p_holm"]


def study_frame(cells: Sequence[StudyCell]) -> pd.DataFrame:
    records = [{"train_size": c.train_size, "adapter": c.adapter, "strategy": c.strategy, "dataset": c.dataset,
                "acc": c.acc, "stderr": c.stderr, "n": c.n, "unparsed": c.unparsed,
                "unparsed_rate": c.unparsed / c.n if c.n else None, "fixed": c.fixed, "broken": c.broken,
                "p": c.p, "p_holm": c.p_holm} for c in cells]
    return pd.DataFrame.from_records(records, columns=COLUMNS)


def render() -> None:
    st.title("Study: the published protocol")
    st.caption("Multi-task adapters (`tad train --datasets ... --format llm-adapters`) at several train sizes, "
               "evaluated by generation; reproduce with `python bench/study_protocol.py`.")
    url = data.database_url()
    options = data.study_options(url)
    if not options:
        st.info("No study runs yet: jobs with a prompt format (e.g. `--format llm-adapters`) on an adapter "
                "trained on several datasets (`tad train --datasets a,b,...`). Run `python bench/study_protocol.py`.")
        return
    base, fmt = st.selectbox("Base model and format", options, format_func=lambda o: f"{o[0]} · {o[1]}",
                             key="st_choice")
    df = study_frame(data.study(url, base, fmt))
    avg = df[df.dataset == AVERAGE]
    st.subheader("Average over the sets, by train size")
    st.altair_chart(alt.Chart(avg).mark_line(point=True).encode(
        x=alt.X("train_size:Q", title="train samples per set", scale=alt.Scale(type="log")),
        y=alt.Y("acc:Q", title="accuracy (macro average)", scale=alt.Scale(zero=False)),
        color=alt.Color("strategy:N"), tooltip=["strategy", "train_size", "acc", "n", "unparsed_rate", "p_holm"]),
        width="stretch")
    # one table per (train size, adapter): two adapters trained on as many samples are two tables (a pivot over
    # the size alone kept one adapter's accuracies beside the other's statistics)
    for (size, adapter), part in df.groupby(["train_size", "adapter"], sort=True):
        st.subheader(f"Train size {size} per set · {adapter}")
        wide = part.pivot_table(index="strategy", columns="dataset", values="acc", aggfunc="first")
        stats = part[part.dataset == AVERAGE].set_index("strategy")[
            ["n", "unparsed", "unparsed_rate", "fixed", "broken", "p", "p_holm"]]
        st.dataframe(wide.join(stats), width="stretch", key=f"st_table_{size}_{adapter}")
    st.caption("p: exact McNemar against ft on the pooled samples of every set; p_holm: Holm-adjusted over the "
               "strategies of that train size. unparsed: outputs with no label, counted wrong.")
