"""Paired statistics for comparing two prompts on the same rows: a bootstrap interval of the
difference, McNemar's exact test for right/wrong outcomes, a sign-flip permutation test for
continuous per-item scores (ROUGE), and Holm's correction for several comparisons at once.

Every random draw is seeded (numpy's default_rng), so the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Difference:
    """b - a on the same rows: the mean difference, its paired-bootstrap interval and a p-value."""

    n: int
    a: float  # mean of a
    b: float  # mean of b
    diff: float  # mean of b - a
    low: float
    high: float
    p: float
    test: str  # "mcnemar" (right/wrong outcomes) or "permutation" (continuous scores)

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def verdict(self) -> str:
        if not self.significant:
            return "no significant gain" if self.diff >= 0 else "no significant difference"
        return "significant gain" if self.diff > 0 else "significant loss"


def _pair(a: Sequence[float], b: Sequence[float]):
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two equally long lists, not {len(a)} and {len(b)}")
    if x.size == 0:
        raise ValueError("paired scores need at least one row")
    return x, y


def bootstrap_ci(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of mean(b - a) over `resamples` resamplings of the rows (with
    replacement; a row keeps its pair together)."""
    import numpy as np

    x, y = _pair(a, b)
    d = y - x
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 2_000_000 // d.size)  # rows x resamples per chunk, to bound memory
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        means[start:start + count] = d[rng.integers(0, d.size, size=(count, d.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact (integer arithmetic, correctly rounded)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float, float]:
    """McNemar's exact test on paired right/wrong outcomes: (only a right, only b right, two-sided
    exact p, two-sided mid-p). The exact p is 2 P(X <= min) for X ~ Bin(discordant, 1/2), capped at 1;
    the mid-p subtracts P(X = min) once (less conservative, Fagerland et al. 2013)."""
    x, y = _pair(a, b)
    only_a = int(((x != 0) & (y == 0)).sum())
    only_b = int(((x == 0) & (y != 0)).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return only_a, only_b, 1.0, 1.0
    exact = min(1.0, 2 * _binom_cdf_half(k, n))
    mid = min(1.0, 2 * _binom_cdf_half(k, n) - math.comb(n, k) / 2**n)
    return only_a, only_b, exact, mid


def permutation_p(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(b - a) = 0: each row's difference keeps or flips
    its sign. Exact (all 2^n sign patterns) when 2^n <= resamples, else Monte Carlo with the
    (count + 1) / (resamples + 1) estimate, which never gives 0."""
    import numpy as np

    x, y = _pair(a, b)
    d = y - x
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if 2 ** d.size <= resamples:
        patterns = ((np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1) * 2 - 1
        stats = np.abs((patterns * d).mean(axis=1))
        return float((stats >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    count, step = 0, max(1, 2_000_000 // d.size)
    for start in range(0, resamples, step):
        signs = rng.integers(0, 2, size=(min(step, resamples - start), d.size)) * 2 - 1
        count += int((np.abs((signs * d).mean(axis=1)) >= observed - tol).sum())
    return (count + 1) / (resamples + 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given: the i-th smallest is multiplied by
    (m - i + 1), made non-decreasing, capped at 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def is_binary(values: Sequence[float]) -> bool:
    return all(v in (0, 1) for v in values)


def compare(a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = RESAMPLES,
            binary: bool | None = None) -> Difference:
    """b against a on the same rows: McNemar's exact p for right/wrong (0/1) outcomes, else the
    paired permutation p; the paired-bootstrap interval either way. binary=None: decided from the
    values (say False for scores such as ROUGE that can happen to be all 0 or 1)."""
    x, y = _pair(a, b)
    low, high = bootstrap_ci(x, y, resamples, seed)
    if binary is None:
        binary = is_binary(x.tolist()) and is_binary(y.tolist())
    if binary:
        p, test = mcnemar(x, y)[2], "mcnemar"
    else:
        p, test = permutation_p(x, y, resamples, seed), "permutation"
    return Difference(int(x.size), float(x.mean()), float(y.mean()), float((y - x).mean()), low, high, p, test)
