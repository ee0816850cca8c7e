"""Interval estimates for accuracies and seed means."""

from __future__ import annotations

import bisect
import math
from statistics import NormalDist


def wilson_interval(correct: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion correct/n (Wilson 1927); (nan, nan) for n = 0."""
    if n <= 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # min/max with p: in floating point the bounds can land a hair on the wrong side of p at 0/n or n/n
    return (max(0.0, min(centre - half, p)), min(1.0, max(centre + half, p)))


def newcombe_interval(k1: float, n1: int, k2: float, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for the difference of two proportions k1/n1 - k2/n2 from their Wilson intervals
    (Newcombe 1998, method 10, the hybrid score interval)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, confidence)
    l2, u2 = wilson_interval(k2, n2, confidence)
    d = p1 - p2
    return (d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (standard tables).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (95% two-sided).

    Table values up to 30; beyond, the Cornish-Fisher expansion around the normal quantile
    (error below 1e-4 there)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values (df >= 1)")
    if df <= len(_T975):
        return _T975[df - 1]
    z = NormalDist().inv_cdf(0.975)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def seed_summary(values: list[float]) -> dict[str, float]:
    """Mean, sample std and 95% t-interval over per-seed values (a single value: no interval)."""
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_seeds": 0}
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_seeds": 1}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n_seeds": n}



def roc_auc(negatives: list[float], positives: list[float]) -> float:
    """Area under the ROC curve of a score that should be higher for ``positives``: the chance a
    random positive scores above a random negative, ties counting half (Mann-Whitney U / n1 n2).
    NaN when either side is empty."""
    if not negatives or not positives:
        return math.nan
    neg = sorted(negatives)
    below = equal = 0.0
    for p in positives:
        lo, hi = bisect.bisect_left(neg, p), bisect.bisect_right(neg, p)
        below, equal = below + lo, equal + (hi - lo)
    return (below + equal / 2) / (len(neg) * len(positives))


def ratio_interval(k1: float, n1: int, k2: float, n2: int, confidence: float = 0.95) -> tuple[float, float]:
    """Interval for the ratio of two proportions (k1/n1) / (k2/n2), Katz et al. 1978's log method;
    a zero count gets 0.5 added to it (Haldane), so the interval stays finite."""
    if min(n1, n2) <= 0:
        return (math.nan, math.nan)
    if k1 == 0 or k2 == 0:
        k1, k2 = k1 + 0.5, k2 + 0.5
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    log_ratio = math.log((k1 / n1) / (k2 / n2))
    half = z * math.sqrt(max(1 / k1 - 1 / n1 + 1 / k2 - 1 / n2, 0.0))
    return (math.exp(log_ratio - half), math.exp(log_ratio + half))
