"""Interval estimates for accuracies and seed means."""

from __future__ import annotations

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
    return (max(0.0, centre - half), min(1.0, centre + half))


def format_accuracy(acc: float, n: int) -> str:
    """'97.3% [96.1, 98.2] (n=1000)': accuracy with its 95% Wilson interval."""
    lo, hi = wilson_interval(acc * n, n)
    return f"{100 * acc:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"
