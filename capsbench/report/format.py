"""Table and number formatters shared by the parts, summary.md and the report."""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

from capsbench.report.stats import seed_summary, wilson_interval


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def interval_cell(value: float, lo: float, hi: float, digits: int = 1) -> str:
    """'97.3% [96.1, 98.2]': a fraction and its interval bounds (fractions) as percentages."""
    return f"{100 * value:.{digits}f}% [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def format_accuracy(acc: float, n: int) -> str:
    """'97.3% [96.1, 98.2] (n=1000)': accuracy with its 95% Wilson interval."""
    return f"{interval_cell(acc, *wilson_interval(acc * n, n))} (n={n})"


def accuracy_cell(values: list[tuple[float, int]]) -> str:
    """Per-seed (accuracy, n) -> '98.1 [97.1, 98.8] (n=1000, 1 seed)' or a t-interval over seeds."""
    if not values:
        return "–"
    if len(values) == 1:
        acc, n = values[0]
        lo, hi = wilson_interval(acc * n, int(n))
        return f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] (n={int(n)}, 1 seed, Wilson)"
    s = seed_summary([100 * a for a, _ in values])
    ns = sorted({int(n) for _, n in values})
    lo, hi = max(s["ci_low"], 0.0), min(s["ci_high"], 100.0)  # an accuracy lies in [0, 100]
    return (f"{s['mean']:.1f} ± {s['std']:.1f} [{lo:.1f}, {hi:.1f}] "
            f"(n={'/'.join(map(str, ns))}, {len(values)} seeds, t)")  # fmt: skip


def checks_footer(checks: Iterable[Any], note: str = "") -> list[str]:
    """'**Checks**: X of Y passed.' and one '- FAIL name: detail' line per failed check
    (``checks``: objects with name, passed and detail; ``note`` follows the count)."""
    checks = list(checks)
    failed = [c for c in checks if not c.passed]
    head = f"**Checks**: {len(checks) - len(failed)} of {len(checks)} passed{note}."
    return [head] + [f"- FAIL {c.name}: {c.detail}" for c in failed]
