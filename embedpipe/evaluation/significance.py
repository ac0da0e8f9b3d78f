"""Paired significance of a per-query difference between two retrievers (numpy only).

Why a sign-flip test: a benchmark of ~50 human queries cannot carry a normal approximation, and every
query is scored by both models, so the honest null hypothesis is "the label base/fine-tuned is
exchangeable within each query". Under it each per-query difference is as likely to be +d as -d; the
p-value is the share of sign assignments whose mean difference is at least as far from zero as the one
observed (two-sided). Exact over all 2^n assignments for small n, Monte Carlo otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

EXACT_MAX = 16  # 2^16 sign patterns (65,536) are enumerated exactly; above that, random sign flips
RESAMPLES = 100_000
_TOL = 1e-12  # float noise: a flipped sum equal to the observed one must count as "as extreme"


@dataclass(frozen=True)
class SignFlipResult:
    """Outcome of a paired sign-flip test on per-query differences (b - a)."""

    p_value: float
    mean_diff: float
    n: int  # queries
    better: int  # queries where b > a
    worse: int  # queries where b < a
    tied: int
    exact: bool  # True: all 2^(n - tied) sign patterns enumerated


def sign_flip_test(
    differences: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> SignFlipResult:
    """Two-sided paired sign-flip (permutation) test of mean(differences) == 0.

    Zero differences are left out of the enumeration: flipping a zero changes nothing, so the p-value is
    the same with or without them. Exact when at most EXACT_MAX differences are non-zero; otherwise
    `resamples` random sign vectors (fixed `seed`, so reruns give the same p) with the usual +1
    correction, p = (hits + 1) / (resamples + 1), which never reports an impossible p = 0.
    """
    d = np.asarray(differences, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("sign_flip_test needs at least one difference")
    nonzero = d[d != 0.0]
    better, worse = int((d > 0).sum()), int((d < 0).sum())
    tied = int(d.size - better - worse)
    base = SignFlipResult(1.0, float(d.mean()), int(d.size), better, worse, tied, True)
    if nonzero.size == 0:
        return base
    observed = abs(nonzero.sum()) - _TOL * (1.0 + np.abs(nonzero).sum())
    m = nonzero.size
    if m <= EXACT_MAX:
        patterns = np.arange(2**m, dtype=np.int64)[:, None] >> np.arange(m, dtype=np.int64) & 1
        sums = (1 - 2 * patterns) @ nonzero  # bit 1 flips the sign of that difference
        p = float((np.abs(sums) >= observed).sum() / 2**m)
        return SignFlipResult(p, base.mean_diff, base.n, better, worse, tied, True)
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < resamples:  # in blocks, so 100k x 5k queries never sits in memory at once
        block = min(resamples - done, max(1, 2_000_000 // m))
        signs = rng.integers(0, 2, size=(block, m), dtype=np.int8) * 2 - 1
        hits += int((np.abs(signs @ nonzero) >= observed).sum())
        done += block
    p = (hits + 1) / (resamples + 1)
    return SignFlipResult(float(p), base.mean_diff, base.n, better, worse, tied, False)


def paired_bootstrap_ci(
    differences: Sequence[float] | np.ndarray, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(differences), resampling queries with replacement.

    Says how far the measured gain could move with another draw of test queries of the same kind: a gain
    whose interval includes 0 is not shown by this test set. Fixed `seed`, so reruns give the same interval.
    """
    d = np.asarray(differences, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("paired_bootstrap_ci needs at least one difference")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # blocks of 1000 x n indices
        block = min(1000, resamples - start)
        means[start:start + block] = d[rng.integers(0, d.size, size=(block, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
