"""Reading the answer out of a generated text, and judging it against the reference.

A sample's extraction mode comes from (in order) the run's config override, the sample's own `extract` field (set
by formats such as `llm-adapters`), else a default chosen by what the sample carries: `first-match` when it has an
`answer_pattern`, `choice-label` when it lists `choices`, `last-number` otherwise (chain-of-thought math, where the
final number is the answer). An output from which nothing can be extracted is *unparsed*: it counts as wrong and
is counted apart in every table, because a strategy that rambles and one that answers wrongly are different
findings.
"""
from __future__ import annotations

import math
import re

from tad_core.samples import Sample

EXTRACT_MODES: tuple[str, ...] = ("first-match", "first-line", "last-number", "choice-label")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LETTER = re.compile(r"(?:answer is|answer:)?\s*\(?([A-Z])\)?(?:[.):\s]|$)", re.IGNORECASE)


def check_mode(mode: str | None, field: str = "extract") -> None:
    if mode is not None and mode not in EXTRACT_MODES:
        raise ValueError(f"{field}: unknown extraction mode {mode!r}; choose one of {', '.join(EXTRACT_MODES)}")


def default_mode(sample: Sample) -> str:
    if sample.answer_pattern:
        return "first-match"
    if sample.choices or sample.metadata.get("choices"):
        return "choice-label"
    return "last-number"


def first_match(text: str, pattern: str) -> str | None:
    """The first non-empty match of `pattern`: its first non-empty group when it has groups (lm-eval's regex
    filter reads a match's groups so), else the whole match.

    `(-?[$0-9.,]{2,})|(-?[0-9]+)` (lm-eval's GSM8K flexible-extract) on "7 apples and 12 pears" is "7", from the
    second group of the first match; reading group 1 only skipped that match and answered "12". Matches with no
    non-empty group (e.g. `(zzz)?` matches the empty string everywhere) are skipped rather than returned as an
    answer or crashing the shard (there lm-eval keeps the empty first match: unparsed)."""
    for m in re.finditer(pattern, text):
        groups = m.groups() if m.re.groups else (m.group(0),)
        value = next((g.strip() for g in groups if g and g.strip()), None)
        if value:
            return value
    return None


def first_line(text: str) -> str | None:
    """The first non-blank line, stripped: the answer of a model that states it and then keeps talking."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def choice_label(text: str, choices: list[str]) -> str | None:
    """A leading choice letter (`B)`, `answer: C`), else the choice whose text appears first in the output."""
    m = _LETTER.match(text.strip())
    if m and ord(m.group(1).upper()) - 65 < len(choices):
        return choices[ord(m.group(1).upper()) - 65]
    lowered = text.lower()
    hits = [(lowered.find(c.lower()), c) for c in choices if c.lower() in lowered]
    return min(hits)[1] if hits else None


def extract_answer(text: str, sample: Sample, mode: str | None = None) -> str | None:
    """The answer in a generated text under `mode` (default: the sample's own, see the module docstring);
    None when the output holds no answer (unparsed)."""
    mode = mode or sample.extract or default_mode(sample)
    if mode == "first-match":
        if not sample.answer_pattern:
            raise ValueError(f"sample {sample.id!r}: extraction 'first-match' needs an answer_pattern")
        return first_match(text, sample.answer_pattern)
    if mode == "first-line":
        line = first_line(text)
        return first_match(line, sample.answer_pattern) if line and sample.answer_pattern else line
    if mode == "choice-label":
        return choice_label(text, list(sample.choices) or list(sample.metadata.get("choices", [])))
    if mode == "last-number":
        return last_number(text)
    raise ValueError(f"extract: unknown extraction mode {mode!r}; choose one of {', '.join(EXTRACT_MODES)}")


def answers_match(extracted: str | None, reference: str) -> bool:
    """Exact match after stripping, case-insensitive; numbers compare by value (`1,234` = `1234.0`)."""
    if extracted is None:
        return False
    a, b = extracted.strip(), reference.strip()
    try:
        return math.isclose(float(a.replace(",", "")), float(b.replace(",", "")), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return a.lower() == b.lower()
