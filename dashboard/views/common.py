"""Formatting and selection helpers shared by the pages."""
from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import streamlit as st

from dashboard import data
from services.db.views import RunRow

NO_RUNS = "No runs yet: run `make demo` or `tad run --dataset ... --strategy ft --strategy tad:alpha=0.5,1,2`."


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]$~#|<>])")


def md(text: object) -> str:
    """User-supplied text (names, prompts, outputs, error messages) made literal inside Streamlit markdown
    (st.markdown / caption / error / success): links, images, `:color[...]` directives, emphasis, code and LaTeX
    are neutralised by backslash-escaping their characters, so `evil[/bold]` or `[click](...)` shows as typed."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def pm(value: float | None, se: float | None, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{value:.{digits}f}"


def model_label(base: str, adapter: str | None) -> str:
    return f"{base} + {adapter}" if adapter else base


def run_label(r: RunRow) -> str:
    return f"run {r.run_id} · job {r.job_id} · {model_label(r.base, r.adapter_label)} · {r.label} · acc {pm(r.acc, r.acc_stderr, 3)} (n={r.n})"


def ago(t: datetime | None, now: datetime | None = None) -> str:
    if t is None:
        return "–"
    now = now or datetime.now(timezone.utc)
    if t.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
        t = t.replace(tzinfo=timezone.utc)
    s = max(0.0, (now - t).total_seconds())
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} d ago"


def as_utc(t: datetime | None) -> datetime | None:
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=timezone.utc)
    return t


def all_runs(url: str) -> list[RunRow]:
    """Every run, or stop the page with the 'no runs yet' hint."""
    rows = data.runs(url)
    if not rows:
        st.info(NO_RUNS, icon=":material/hourglass_empty:")
        st.stop()
    return rows


def pick_dataset(rows: Sequence[RunRow], key: str, label: str = "Dataset",
                 where: Any = None) -> tuple[int, list[RunRow]]:
    """A dataset selectbox over the datasets these runs cover; returns (dataset id, its runs)."""
    by_id: dict[int, str] = {}
    rank: dict[int, tuple[bool, int]] = {}
    for r in rows:
        by_id.setdefault(r.dataset_id, f"{r.dataset}:{r.split} (v{r.dataset_version}, {r.task_type})")
        has, newest = rank.get(r.dataset_id, (False, 0))
        rank[r.dataset_id] = (has or r.n > 0, max(newest, r.job_id))
    # datasets with results first, newest first
    order = sorted(by_id, key=lambda d: (not rank[d][0], -rank[d][1]))
    target = where or st
    ds_id = target.selectbox(label, order, format_func=by_id.__getitem__, key=key)
    return ds_id, [r for r in rows if r.dataset_id == ds_id]


def choice_text(sample: dict[str, Any] | None, index: int | None) -> str | None:
    """The text of choice `index` of a multiple-choice sample (None when not applicable)."""
    if sample is None or index is None:
        return None
    choices = sample.get("choices") or sample.get("choice_prompts") or []
    if 0 <= index < len(choices):
        return f"{index}: {choices[index]}"
    return str(index)


def gold_text(sample: dict[str, Any] | None) -> str:
    if sample is None:
        return "–"
    if sample.get("reference") is not None:
        return str(sample["reference"])
    answer = sample.get("answer")
    choices = sample.get("choices") or sample.get("choice_prompts") or []
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return f"{answer}: {choices[answer]}"
    if isinstance(answer, list):
        return " | ".join(str(a) for a in answer)
    return "–" if answer is None else str(answer)


def prompt_text(sample: dict[str, Any] | None, limit: int = 400) -> str:
    if sample is None:
        return "–"
    text = str(sample.get("prompt") or "")
    if not text and sample.get("choice_prompts"):  # partial scoring: the choices are the contexts
        text = f"[choice contexts] … {sample.get('continuation', '')}"
    return text if len(text) <= limit else text[: limit - 1] + "…"
