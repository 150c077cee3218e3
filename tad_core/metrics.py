"""Metrics and statistics over per-sample outcomes: pure functions, no model, no DB.

Standard errors are closed form for means (sample std / sqrt(n), as lm-evaluation-harness reports); confidence
intervals come from the bootstrap; paired comparisons of two strategies or runs on the same samples use the
exact McNemar test for 0/1 outcomes (scipy's binomial test on the discordant pairs) and the paired bootstrap for
continuous ones.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    value: float
    stderr: float
    n: int
    ci_low: float
    ci_high: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def _std_err(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def proportion_stderr(p: float, n: int) -> float | None:
    """Standard error of a proportion `p` of `n` 0/1 outcomes, from the counts alone: sqrt(p(1-p)/(n-1)), which
    is the sample std / sqrt(n) of `accuracy` (so aggregates computed in SQL match it); None when n < 2."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


def macro_average_stderr(stderrs: Sequence[float]) -> float | None:
    """Standard error of the unweighted mean of k independent estimates: sqrt(sum se_i^2) / k (None for none)."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs) if stderrs else None


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    if len(x) == 1 or np.all(x == x[0]):
        return (float(x[0]), float(x[0]))
    res = stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=n_boot, method="percentile",
                          random_state=np.random.default_rng(seed), vectorized=True)
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def mean_estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return Estimate(float("nan"), float("nan"), 0, float("nan"), float("nan"))
    lo, hi = bootstrap_ci(x, level)
    return Estimate(float(x.mean()), _std_err(x), len(x), lo, hi)


def accuracy(correct: Sequence[bool]) -> Estimate:
    """Accuracy (or exact match) with its closed-form standard error and a bootstrap CI."""
    return mean_estimate([1.0 if c else 0.0 for c in correct])


def argmax_lowest(scores: Sequence[float]) -> int:
    """Index of the largest score, ties to the lowest index (lm-evaluation-harness convention)."""
    best, best_i = -math.inf, 0
    for i, s in enumerate(scores):
        if s > best:
            best, best_i = s, i
    return best_i


def mc_predictions(scores: Sequence[float], cont_chars: Sequence[int]) -> tuple[int, int]:
    """(`acc` prediction, `acc_norm` prediction): argmax of summed log-prob, and of it per continuation char."""
    norm = [s / max(n, 1) for s, n in zip(scores, cont_chars)]
    return argmax_lowest(scores), argmax_lowest(norm)


@dataclass(frozen=True)
class McNemarResult:
    both_right: int
    fixed: int  # wrong under the reference (a), right under the candidate (b)
    broken: int  # right under a, wrong under b
    both_wrong: int
    p_value: float
    diff: float  # acc(b) - acc(a)
    diff_ci_low: float
    diff_ci_high: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (binomial test, p = 0.5)."""
    return 1.0 if fixed + broken == 0 else float(stats.binomtest(fixed, fixed + broken, 0.5).pvalue)


def mcnemar_exact_ci(fixed: int, broken: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the paired difference `(fixed - broken) / n` that agrees with the exact McNemar test:
    given the `fixed + broken` discordant pairs, the Clopper-Pearson interval of their share that is `fixed`,
    mapped onto the difference. At level `1 - alpha` it excludes 0 exactly when `mcnemar_p < alpha` (both are
    the central exact binomial test at 0.5), so a shown interval cannot contradict the verdict, as the
    paired-bootstrap interval could (it excluded 0 at p = 0.06)."""
    m = fixed + broken
    if n == 0:
        return float("nan"), float("nan")
    if m == 0:
        return 0.0, 0.0
    ci = stats.binomtest(fixed, m, 0.5).proportion_ci(confidence_level=level, method="exact")
    return m / n * (2 * ci.low - 1), m / n * (2 * ci.high - 1)


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool], level: float = 0.95) -> McNemarResult:
    """Exact McNemar test of b against a on the same samples, with the exact interval of acc(b) - acc(a) that
    agrees with it (`mcnemar_exact_ci`; a paired-bootstrap interval excluded 0 where p was 0.06)."""
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired test needs the same samples: {len(a_correct)} vs {len(b_correct)} outcomes")
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    both_right = int((a & b).sum())
    fixed = int((~a & b).sum())
    broken = int((a & ~b).sum())
    both_wrong = int((~a & ~b).sum())
    p = mcnemar_p(fixed, broken)
    lo, hi = mcnemar_exact_ci(fixed, broken, len(a), level)
    return McNemarResult(both_right, fixed, broken, both_wrong, p, (fixed - broken) / len(a) if len(a) else float("nan"),
                         lo, hi)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 5000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Paired bootstrap of mean(b - a): the difference, its CI, and a two-sided p-value (shift method)."""
    if len(a) != len(b):
        raise ValueError(f"paired test needs the same samples: {len(a)} vs {len(b)} values")
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    observed = float(d.mean())
    centered = means - observed
    p = float((np.abs(centered) >= abs(observed)).mean()) if observed != 0 else 1.0
    alpha = (1 - level) / 2
    return {"diff": observed, "ci_low": float(np.quantile(means, alpha)), "ci_high": float(np.quantile(means, 1 - alpha)),
            "p_value": p, "n": int(len(d))}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None entries are skipped and stay None).

    A job compares many strategies (a whole alpha sweep, several baselines) against `ft` on the same samples; at
    10 comparisons one uncorrected p < 0.05 is likely by chance alone. Holm's step-down adjustment controls the
    family-wise error rate without assumptions on how the tests depend on each other:
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) for the sorted p_(1) <= ... <= p_(m).
    """
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def fixed_or_broken(ft_correct: bool | None, correct: bool | None) -> str | None:
    """Whether a strategy fixed (ft wrong, it right) or broke (ft right, it wrong) a sample relative to `ft`."""
    if ft_correct is None or correct is None or ft_correct == correct:
        return None
    return "fixed" if correct else "broken"
