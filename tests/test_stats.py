"""Paired statistics (llmlab.scoring.stats) against scipy and hand computation on fixed tables."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from llmlab.scoring import stats

# A fixed paired table: a right on 60 of 100 rows, b on 70; 5 rows only a right, 15 only b right.
A = [1] * 55 + [1] * 5 + [0] * 15 + [0] * 25
B = [1] * 55 + [0] * 5 + [1] * 15 + [0] * 25


def test_mcnemar_exact_and_mid_p_by_hand_and_scipy():
    only_a, only_b, exact, mid = stats.mcnemar(A, B)
    assert (only_a, only_b) == (5, 15)
    by_hand = 2 * sum(math.comb(20, i) for i in range(6)) / 2**20
    assert exact == pytest.approx(by_hand, rel=1e-12)
    assert exact == pytest.approx(sps.binomtest(5, 20, 0.5).pvalue, rel=1e-12)
    assert exact == pytest.approx(0.041389, abs=1e-6)
    assert mid == pytest.approx(by_hand - math.comb(20, 5) / 2**20, rel=1e-12)
    assert stats.mcnemar([1, 0], [1, 0])[2:] == (1.0, 1.0)  # no discordant pair
    # a large table: integer arithmetic, no underflow (2**900 is far below float range as 0.5**900)
    big_a, big_b = [1] * 400 + [0] * 500, [0] * 400 + [1] * 500
    assert stats.mcnemar(big_a, big_b)[2] == pytest.approx(sps.binomtest(400, 900, 0.5).pvalue, rel=1e-9)


def test_permutation_exact_equals_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.random(10), rng.random(10) + 0.2
    ours = stats.permutation_p(a, b, resamples=10_000)  # 2**10 <= 10,000: every sign pattern
    ref = sps.permutation_test((b, a), lambda x, y: np.mean(x - y), permutation_type="samples",
                               n_resamples=np.inf, alternative="two-sided").pvalue
    assert ours == pytest.approx(ref, rel=1e-12)


def test_permutation_monte_carlo_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(5)
    a, b = rng.random(16), rng.random(16) + 0.15
    exact = stats.permutation_p(a, b, resamples=2**16)
    mc = stats.permutation_p(a, b, resamples=20_000, seed=1)
    assert mc == stats.permutation_p(a, b, resamples=20_000, seed=1)
    assert mc == pytest.approx(exact, abs=0.01)


def test_bootstrap_matches_scipy_percentile_interval():
    low, high = stats.bootstrap_ci(A, B, resamples=20_000, seed=0)
    ref = sps.bootstrap((np.array(A, float), np.array(B, float)), lambda x, y: np.mean(y - x), paired=True,
                        method="percentile", n_resamples=20_000, random_state=0, vectorized=False).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.011) and high == pytest.approx(ref.high, abs=0.011)
    assert (low, high) == stats.bootstrap_ci(A, B, resamples=20_000, seed=0)  # seeded: the same again
    # every row differs by exactly 0.25: no resampling can move the mean
    assert stats.bootstrap_ci([0.0, 0.5, 0.25], [0.25, 0.75, 0.5]) == pytest.approx((0.25, 0.25))


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.04 -> x4, x3, x2, x1 = 0.04, 0.06, 0.06 (monotone), 0.06 (monotone)
    assert stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


@pytest.mark.parametrize("a, b, test, significant, verdict", [
    (A, B, "mcnemar", True, "significant gain"),
    (B, A, "mcnemar", True, "significant loss"),
    (A, A, "mcnemar", False, "no significant gain"),
    ([0.1, 0.4, 0.3, 0.2] * 5, [0.1, 0.45, 0.2, 0.2] * 5, "permutation", False, "no significant difference"),
])
def test_compare_picks_the_test(a, b, test, significant, verdict):
    d = stats.compare(a, b)
    assert d.test == test and d.significant is significant and d.verdict() == verdict
    assert d.diff == pytest.approx(np.mean(b) - np.mean(a))
    assert d.low <= d.diff <= d.high


def test_unpaired_lengths_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        stats.compare([1, 0], [1])
