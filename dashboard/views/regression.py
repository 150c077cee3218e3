"""Regressions: per adapter family, accuracy of each version over time for each dataset and strategy, each version
compared on the same samples with a baseline version (the promoted one, or the previous version): difference with
its exact interval and the exact McNemar p-value (tad_core.metrics.mcnemar); significant drops are flagged.

Built from the stored runs (runs of different versions of one family on the same dataset and strategy), so it
reads the same data a `tad regress` gate would; the verdicts `tad regress` stored (regression_checks) are shown
above the charts when there are any.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import altair as alt
import pandas as pd
import streamlit as st

from dashboard import data
from dashboard.views.common import as_utc, md
from services.db import store
from services.gates import newest_per_suite
from services.db.views import PairedOutcome, RunRow
from services.regress import verdict
from tad_core.metrics import mcnemar


@dataclass(frozen=True)
class Verdict:
    dataset: str
    strategy: str
    version: int
    baseline: int | None
    acc: float | None
    stderr: float | None
    n: int
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    verdict: str  # baseline | improved | unchanged | regressed | no baseline | no overlap | errors
    run_id: int
    baseline_run_id: int | None


def latest_per_version(rows: Sequence[RunRow]) -> dict[tuple[int, str, int], dict[int, RunRow]]:
    """(dataset id, strategy key, samples) -> {version: newest run of that version whose job finished `done`}.

    Only finished jobs (a running job's partial run was preferred to the finished one), and grouped by the number
    of samples too, so the versions of one group were evaluated on the same slice and their plotted accuracies
    are comparable with the paired difference (`--limit 20` and `--limit 200` runs are separate groups)."""
    out: dict[tuple[int, str, int], dict[int, RunRow]] = {}
    for r in rows:  # newest job first
        if r.adapter_version is None or r.n == 0 or r.acc is None or r.job_status != "done":
            continue
        out.setdefault((r.dataset_id, r.label, r.n), {}).setdefault(r.adapter_version, r)
    return out


def verdicts(rows: Sequence[RunRow], paired: Callable[[int, int], Sequence[PairedOutcome]], *,
             against: str = "promoted", promoted: int | None = None, alpha: float = 0.05,
             min_effect: float = 0.01, errors: Callable[[int], set[int]] = lambda run_id: set()) -> list[Verdict]:
    """Every version of every (dataset, strategy) against its baseline: `promoted` (the promoted version, for all
    others) or `previous` (the next lower version that has a run). As in `tad regress`: the interval is the exact
    one at level 1 - alpha, and a pair of runs with samples that failed on one side only (`errors(run_id)`: the
    failed sample indices) gets no verdict (`errors`)."""
    out = []
    for (_, key, _), by_version in latest_per_version(rows).items():
        versions = sorted(by_version)
        for v in versions:
            run = by_version[v]
            if against == "promoted":
                base_v = promoted if promoted in by_version and promoted != v else None
            else:
                lower = [u for u in versions if u < v]
                base_v = lower[-1] if lower else None
            common = dict(dataset=run.dataset_label, strategy=key, version=v, acc=run.acc, stderr=run.acc_stderr,
                          n=run.n, run_id=run.run_id)
            if base_v is None:
                label = "baseline" if (against == "promoted" and v == promoted) or \
                    (against == "previous" and v == versions[0]) else "no baseline"
                out.append(Verdict(**common, baseline=None, diff=None, ci_low=None, ci_high=None, p_value=None,
                                   verdict=label, baseline_run_id=None))
                continue
            base_run = by_version[base_v]
            pairs = paired(base_run.run_id, run.run_id)
            if not pairs:
                out.append(Verdict(**common, baseline=base_v, diff=None, ci_low=None, ci_high=None, p_value=None,
                                   verdict="no overlap", baseline_run_id=base_run.run_id))
                continue
            res = mcnemar([p.a_correct for p in pairs], [p.b_correct for p in pairs], level=1 - alpha)
            one_sided = errors(base_run.run_id) ^ errors(run.run_id)
            label = "errors" if one_sided else verdict(res.diff, res.p_value, alpha, min_effect)  # tad regress' rule
            out.append(Verdict(**common, baseline=base_v, diff=res.diff, ci_low=res.diff_ci_low,
                               ci_high=res.diff_ci_high, p_value=res.p_value, verdict=label,
                               baseline_run_id=base_run.run_id))
    return sorted(out, key=lambda x: (x.dataset, x.strategy, x.version))


def render() -> None:
    st.title("Regressions")
    url = data.database_url()
    adapters = data.adapters(url)
    if not adapters:
        st.info("No registered adapters yet: register one with `tad adapters register NAME DIR`, or submit a job "
                "with `--adapter DIR` (it is registered on submission).")
        return
    families = list(dict.fromkeys(a.name for a in adapters))
    c1, c2, c3, c4 = st.columns([2, 2, 1, 1])
    family = c1.selectbox("Adapter family", families, key="rg_family")
    versions = [a for a in adapters if a.name == family]
    promoted = next((a.version for a in versions if a.promoted), None)
    options = ["promoted", "previous"] if promoted is not None else ["previous"]
    against = c2.radio("Compare each version with", options, horizontal=True, key="rg_against",
                       format_func={"promoted": f"promoted version (v{promoted})",
                                    "previous": "previous version"}.__getitem__)
    alpha = c3.number_input("significance", 0.001, 0.5, 0.05, step=0.01, format="%.3f", key="rg_alpha")
    min_effect = c4.number_input("min effect", 0.0, 1.0, 0.01, step=0.01, key="rg_min_effect",
                                 help="smallest |acc difference| that counts as a change (tad regress' default)")
    gates = data.gate_runs(url, family)
    newest = newest_per_suite(gates)
    st.dataframe(pd.DataFrame.from_records([{
        "version": a.version, "promoted": "★" if a.promoted else "",
        "gates": ", ".join(f"{g.suite} {g.status}" for g in newest.get(a.id, [])) or "-",
        "registered": as_utc(a.created_at),
        "method": a.method, "sha256": a.sha256[:12], "base model": a.base_model, "path": a.path,
        "manifest": ", ".join(f"{k}={v}" for k, v in list(a.manifest.items())[:4])} for a in versions]),
        hide_index=True, width="stretch")
    _gate_runs(gates)
    _gate_checks(data.regression_checks(url, family))
    rows = data.runs(url, adapter_name=family)
    if not rows:
        st.info(f"No runs of {family} yet: evaluate its versions on the same dataset and strategies, e.g. "
                f"`tad run --adapter {family}:latest --dataset ... --strategy ft`.")
        return
    found = verdicts(rows, lambda a, b: data.paired(url, a, b), against=against, promoted=promoted,
                     alpha=float(alpha), min_effect=float(min_effect), errors=lambda r: data.error_indices(url, r))
    if not found:
        st.info(f"No finished runs of {family} yet: versions are compared once their jobs are done.")
        return
    created = {a.version: as_utc(a.created_at) for a in versions}
    df = pd.DataFrame.from_records([{**v.__dict__, "registered": created.get(v.version)} for v in found])
    df["baseline"] = df["baseline"].astype("Int64")
    regressed = df[df["verdict"] == "regressed"]
    if regressed.empty:
        st.success(f"No regression at significance {alpha:g} (min effect {min_effect:g}; each row tested on its "
                   "own, where a `tad regress` gate adjusts its rows' p-values together, Holm).",
                   icon=":material/check_circle:")
    else:
        st.error(f"{len(regressed)} regression(s): " + "; ".join(
            f"v{r.version} vs v{r.baseline} on {md(r.dataset)} / {md(r.strategy)}: {r.diff:+.4f} (p={r.p_value:.3g})"
            for r in regressed.itertuples()), icon=":material/trending_down:")
    for dataset in sorted(df["dataset"].unique()):
        sub = df[df["dataset"] == dataset].copy()
        sub["label"] = "v" + sub["version"].astype(str)
        sub["low"] = sub["acc"] - sub["stderr"].fillna(0)
        sub["high"] = sub["acc"] + sub["stderr"].fillna(0)
        st.subheader(md(dataset))
        order = [f"v{v}" for v in sorted(sub["version"].unique())]
        x = alt.X("label:N", sort=order, title="adapter version (registration order)", axis=alt.Axis(labelAngle=0))
        color = alt.Color("strategy:N", legend=alt.Legend(orient="bottom", columns=3))
        tooltip = ["strategy", "label", alt.Tooltip("registered:T", format="%Y-%m-%d %H:%M"),
                   alt.Tooltip("acc:Q", format=".4f"), "verdict", alt.Tooltip("p_value:Q", format=".3g")]
        band = alt.Chart(sub).mark_errorbar().encode(x=x, y=alt.Y("low:Q", title="acc ± stderr"),
                                                               y2="high:Q", color=color)
        line = alt.Chart(sub).mark_line(point=True).encode(
            x=x, y=alt.Y("acc:Q", scale=alt.Scale(zero=False)), color=color, tooltip=tooltip)
        layers = [band, line]
        for verdict, colour in (("regressed", "#ff2b2b"), ("improved", "#21c354")):
            marked = sub[sub["verdict"] == verdict]
            if not marked.empty:
                layers.append(alt.Chart(marked).mark_point(size=260, shape="triangle-down" if verdict == "regressed"
                                                           else "triangle-up", filled=True, color=colour)
                              .encode(x=x, y="acc:Q", tooltip=tooltip))
        st.altair_chart(alt.layer(*layers).properties(height=300), width="stretch")
        st.caption("▼ red: regressed against the baseline, ▲ green: improved (significant at the chosen level).")
        st.dataframe(sub[["strategy", "version", "baseline", "acc", "stderr", "n", "diff", "ci_low", "ci_high",
                          "p_value", "verdict"]], hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.4f")
                                    for c in ("acc", "stderr", "diff", "ci_low", "ci_high")})


def _gate_runs(gates: Sequence[store.GateRunInfo]) -> None:
    """The gates queued when versions were registered (`--gate`, or the family's gate suites): status, verdict,
    the check it stored, or why there is none."""
    if not gates:
        return
    st.subheader("Gates queued at registration")
    st.dataframe(pd.DataFrame.from_records([{
        "gate": g.id, "candidate": g.candidate, "baseline": g.baseline or "promoted", "suite": g.suite,
        "status": g.status, "check": g.check_id,
        "queued": as_utc(g.created_at), "finished": as_utc(g.finished_at),
        "error": g.error or ""} for g in gates]), hide_index=True, width="stretch")


def _gate_checks(checks: Sequence[store.RegressionCheckInfo]) -> None:
    """The verdicts `tad regress` stored for this family (newest first), and the rows of the newest one."""
    if not checks:
        return
    st.subheader("Gate verdicts (`tad regress`)")
    st.dataframe(pd.DataFrame.from_records([{
        "checked": as_utc(c.created_at), "candidate": c.candidate, "baseline": c.baseline, "suite": c.suite,
        "alpha": c.alpha, "min effect": c.min_effect, "verdict": c.verdict,
        "regressed": "; ".join(f"{r['dataset']}/{r['strategy']}" for r in c.rows if r.get("verdict") == "regressed"),
    } for c in checks]), hide_index=True, width="stretch")
    latest = checks[0]
    st.caption(f"Newest check: {md(latest.candidate)} vs {md(latest.baseline)} on suite {md(latest.suite)}")
    cols = ["dataset", "split", "limit", "strategy", "n", "baseline_acc", "candidate_acc", "diff", "ci_low",
            "ci_high", "p_value", "fixed", "broken", "verdict"]
    st.dataframe(pd.DataFrame.from_records(latest.rows, columns=cols), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.4f")
                                for c in ("baseline_acc", "candidate_acc", "diff", "ci_low", "ci_high")})
