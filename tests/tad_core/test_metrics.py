from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tad_core.metrics import (accuracy, argmax_lowest, bootstrap_ci, fixed_or_broken, mc_predictions, mcnemar,
                              paired_bootstrap)


def test_accuracy_stderr_closed_form():
    c = [True] * 30 + [False] * 70
    est = accuracy(c)
    assert est.value == pytest.approx(0.3)
    assert est.stderr == pytest.approx(np.std([1] * 30 + [0] * 70, ddof=1) / math.sqrt(100))
    assert est.n == 100 and est.ci_low < 0.3 < est.ci_high


def test_argmax_ties_to_lowest_index():
    assert argmax_lowest([1.0, 3.0, 3.0]) == 1
    assert argmax_lowest([-math.inf, -math.inf]) == 0


def test_acc_norm_divides_by_characters():
    # choice 1 has the larger total log-prob, choice 0 the larger per-character one
    assert mc_predictions([-10.0, -8.0], [20, 4]) == (1, 0)


def test_mcnemar_exact_and_contingency():
    a = [True] * 50 + [False] * 50
    b = [True] * 40 + [False] * 10 + [True] * 25 + [False] * 25
    r = mcnemar(a, b)
    assert (r.both_right, r.broken, r.fixed, r.both_wrong) == (40, 10, 25, 25)
    assert r.p_value == pytest.approx(stats.binomtest(25, 35, 0.5).pvalue)
    assert r.diff == pytest.approx(0.15) and r.diff_ci_low < 0.15 < r.diff_ci_high
    assert mcnemar(a, a).p_value == 1.0


def test_mcnemar_needs_same_samples():
    with pytest.raises(ValueError, match="same samples"):
        mcnemar([True], [True, False])


def test_paired_bootstrap_detects_shift():
    rng = np.random.default_rng(1)
    a = rng.normal(size=200)
    res = paired_bootstrap(a, a + 0.5)
    assert res["diff"] == pytest.approx(0.5) and res["p_value"] < 0.01 and res["ci_low"] > 0.3
    null = paired_bootstrap(a, a + rng.normal(scale=0.01, size=200) - 0.0)
    assert null["p_value"] > 0.01


def test_bootstrap_ci_constant():
    assert bootstrap_ci([1.0, 1.0]) == (1.0, 1.0)


def test_fixed_or_broken():
    assert fixed_or_broken(False, True) == "fixed"
    assert fixed_or_broken(True, False) == "broken"
    assert fixed_or_broken(True, True) is None


def test_holm_adjustment():
    from tad_core.metrics import holm

    # textbook: sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.9]) == [pytest.approx(1.0), None, pytest.approx(1.0)]
    assert holm([]) == [] and holm([None]) == [None] and holm([0.2]) == [0.2]
    rng = np.random.default_rng(0)
    raw = list(rng.uniform(0, 0.2, size=12))
    adj = holm(raw)
    assert all(a >= p for a, p in zip(adj, raw)) and max(adj) <= 1.0
    order = np.argsort(raw)
    assert all(adj[order[k]] <= adj[order[k + 1]] for k in range(len(raw) - 1))  # keeps the order of the raw p


def test_proportion_stderr_from_counts_matches_the_per_sample_estimate():
    from tad_core.metrics import proportion_stderr

    outcomes = [True] * 7 + [False] * 5
    assert proportion_stderr(7 / 12, 12) == pytest.approx(accuracy(outcomes).stderr)
    assert proportion_stderr(1.0, 1) is None


def test_macro_average_stderr_of_independent_estimates():
    from tad_core.metrics import macro_average_stderr

    assert macro_average_stderr([0.03, 0.04]) == pytest.approx(0.025)
    assert macro_average_stderr([]) is None


def test_exact_mcnemar_interval_agrees_with_the_test():
    """The interval shown beside a gate's verdict excludes 0 exactly when the exact McNemar p is below alpha (the
    paired bootstrap's did not: fixed 9, broken 20 of 129 gave an interval excluding 0 at p = 0.061)."""
    from tad_core.metrics import mcnemar_exact_ci, mcnemar_p

    for alpha in (0.05, 0.01):
        for fixed in range(0, 25):
            for broken in range(0, 25):
                n = fixed + broken + 40
                lo, hi = mcnemar_exact_ci(fixed, broken, n, 1 - alpha)
                assert lo <= (fixed - broken) / n <= hi
                assert (lo > 0 or hi < 0) == (mcnemar_p(fixed, broken) < alpha), (fixed, broken, alpha)
