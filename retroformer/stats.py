"""Paired statistics for comparing two conditions on the same tasks: McNemar's exact test, Wilson intervals, and a
paired bootstrap interval of a difference in success rates.

Every comparison the project reports is paired: both conditions ran on the same held-out tasks, so a task's two
outcomes are compared with each other, not two independent proportions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (``min(1, 2 * P[X <= min(k, n-k)])``)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test of paired binary outcomes ``a[i]``, ``b[i]`` (the same task under two conditions).

    Only the discordant tasks carry information: ``a_only`` (a succeeded, b failed) and ``b_only``. Under the null
    hypothesis each discordant task is a fair coin; the p-value is the exact two-sided binomial one.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return {"a_only": a_only, "b_only": b_only, "p": binomial_two_sided(a_only, a_only + b_only)}


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when ``n`` is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``mean(b) - mean(a)`` and its percentile bootstrap interval, resampling tasks (pairs) with replacement."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes need equal, non-zero lengths, got {len(a)} and {len(b)}")
    n = len(a)
    diffs = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return sum(diffs) / n, lo, hi
