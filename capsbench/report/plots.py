"""Shared figure helpers (seaborn on matplotlib's Agg backend; no window ever opens)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from capsbench.report.stats import wilson_interval  # noqa: E402


def with_intervals(df: pd.DataFrame) -> pd.DataFrame:
    """Add 95% Wilson bounds (in %) for the accuracy column."""
    bounds = [wilson_interval(a * n, int(n)) for a, n in zip(df.accuracy, df.n)]
    return df.assign(pct=100 * df.accuracy, lo=[100 * b[0] for b in bounds], hi=[100 * b[1] for b in bounds])


LINE_STYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 3))]


def accuracy_lines(df: pd.DataFrame, x: str, hue: str, style: str | None = None, xlabel: str = "",
                   ylabel: str = "accuracy (%)", title: str = "", ax=None) -> Figure:  # fmt: skip
    """Accuracy (%) against ``x``, one line per hue/style group, with 95% Wilson bands."""
    fig = Figure(figsize=(7, 4.5)) if ax is None else ax.figure
    ax = ax if ax is not None else fig.subplots()
    d = with_intervals(df)
    palette = dict(zip(sorted(d[hue].unique()), sns.color_palette("colorblind")))
    styles = {v: LINE_STYLES[i % len(LINE_STYLES)] for i, v in enumerate(sorted(d[style].unique()))} if style else {None: "-"}
    groups = d.groupby([hue, style] if style else [hue], sort=True)
    for key, g in groups:
        h, s = (key if style else (key[0] if isinstance(key, tuple) else key, None))
        g = g.sort_values(x)
        label = f"{h} / {s}" if style else str(h)
        ax.plot(g[x], g.pct, marker="o", ms=4, color=palette[h], linestyle=styles[s], label=label)
        ax.fill_between(g[x], g.lo, g.hi, color=palette[h], alpha=0.15, linewidth=0)
    ax.set(xlabel=xlabel or x, ylabel=ylabel, title=title, ylim=(-2, 102))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def example_grid(rows: list[Tensor], row_names: list[str], labels: list[list[str]], title: str) -> Figure:
    """A grid of images: one row per variant (B, C, S, S) tensor (C = 1: grey; 3: colour; other C: channel
    0, e.g. smallNORB's left camera), each cell titled with ``labels``."""
    k = rows[0].shape[0]
    fig = Figure(figsize=(1.6 * k + 1.5, 1.7 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), k, squeeze=False)
    for r, (imgs, name) in enumerate(zip(rows, row_names)):
        for c in range(k):
            ax = axes[r][c]
            img = imgs[c].permute(1, 2, 0) if imgs.shape[1] == 3 else imgs[c, 0]  # (S, S, 3) or (S, S)
            ax.imshow(img.float().clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(labels[r][c], fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
