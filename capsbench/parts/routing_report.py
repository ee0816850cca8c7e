"""The routing part's figure and summary section: accuracy per model and measure with 95% Wilson
intervals, and the routing statistics clean vs noisy vs adversarial."""

from __future__ import annotations

import math
from typing import Mapping

import pandas as pd

from capsbench.parts.base import Check
from capsbench.parts.routing_config import RoutingConfig
from capsbench.report.format import checks_footer, markdown_table
from capsbench.report.stats import wilson_interval

MEASURES = ("clean", "noise", "composite", "autoattack", "vote", "worst-case")  # the routing table's, in order
LABELS = {"clean": "clean", "noise": "noise", "composite": "composite", "autoattack": "AutoAttack", "vote": "vote",
          "worst-case": "worst case"}  # fmt: skip


def cell(correct: int, n: int) -> str:
    lo, hi = wilson_interval(correct, n)
    return f"{100 * correct / n:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if n else "–"


def accuracy_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model, one column per measure: 'acc [lo, hi]'."""
    rows = []
    for (model, head), g in df.groupby(["model", "head"], sort=False):
        by = {m: (int(c), int(n)) for m, c, n in zip(g.measure, g.correct, g.n)}
        rows.append({"model": model, "head": head, **{LABELS[m]: cell(*by[m]) if m in by else "–" for m in MEASURES}})
    return pd.DataFrame(rows)


def stats_table(st: pd.DataFrame) -> pd.DataFrame:
    """One row per routing model: entropy and agreement clean -> noise -> adversarial."""
    rows = []
    for (model, head), g in st.groupby(["model", "head"], sort=False):
        by = g.set_index("condition")
        ent = " → ".join(f"{by.entropy[c]:.3f}" for c in by.index)
        agree = " → ".join("–" if math.isnan(by.agreement[c]) else f"{100 * by.agreement[c]:.1f}%" for c in by.index)
        rows.append({"model": model, "head": head, "conditions": " → ".join(by.index), "entropy (nats)": ent,
                     "max": f"{g.entropy_max.iloc[0]:.3f}", "top parent = prediction": agree, "n": int(g.n.iloc[0])})  # fmt: skip
    return pd.DataFrame(rows)


def summary(t: Mapping[str, pd.DataFrame], cfg: RoutingConfig, checks: list[Check]) -> str:
    df, st = t["routing"], t["routing_stats"]
    out = ["## Routing", "",
           f"Every model under one protocol: clean and random sign noise (eps {cfg.noise_eps:g}) on the first "
           f"{cfg.n} test images, the affNIST-style composite ({cfg.copies} random affine copies of "
           f"{cfg.composite_n} digits, the affine part's ranges), and at L-inf eps {cfg.eps:g} on the first "
           f"{cfg.attack_n}: AutoAttack ({' -> '.join(cfg.aa_stages)}; {cfg.apgd_steps} APGD steps, "
           f"{cfg.apgd_targets} targets, {cfg.square_queries} Square queries), the vote attack (Gu et al. 2021; "
           f"{cfg.vote_steps} PGD steps on the uniform-vote surrogate) where the model has votes, and the worst case "
           "(robust only if every attack failed). Cells: accuracy % [95% Wilson interval].", "",
           markdown_table(accuracy_table(df)), ""]  # fmt: skip
    if not st.empty:
        out += ["**Routing statistics** on the attacked images, clean → noise → adversarial: mean coupling entropy "
                "per child (log C: uniform, no routing) and the share of children whose top parent is the "
                "predicted class (children with all-equal couplings left out).", "",
                markdown_table(stats_table(st)), ""]  # fmt: skip
    out += checks_footer(checks)
    return "\n".join(out) + "\n"


def routing_figure(t: Mapping[str, pd.DataFrame], cfg: RoutingConfig):
    """Left: accuracy per model and measure with 95% Wilson intervals; right: mean coupling
    entropy per routing model, clean vs noise vs adversarial, against its maximum log C."""
    from matplotlib.figure import Figure

    df, st = t["routing"], t["routing_stats"]
    fig = Figure(figsize=(15, 5))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    models = list(dict.fromkeys(df.model))
    measures = [m for m in MEASURES if m in set(df.measure)]
    width = 0.8 / max(len(measures), 1)
    for i, m in enumerate(measures):
        g = df[df.measure == m].set_index("model").reindex(models)
        acc = 100 * g.correct / g.n
        ci = [wilson_interval(c, n) if n == n and n else (math.nan, math.nan) for c, n in zip(g.correct, g.n)]
        err = [[a - 100 * lo for a, (lo, _) in zip(acc, ci)], [100 * hi - a for a, (_, hi) in zip(acc, ci)]]
        ax.bar([j + (i - len(measures) / 2 + 0.5) * width for j in range(len(models))], acc, width, yerr=err,
               capsize=2, label=LABELS[m])  # fmt: skip
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.legend(fontsize=8, ncol=len(measures), loc="upper center")
    ax.set_title(f"Accuracy per model (eps {cfg.eps:g}; noise eps {cfg.noise_eps:g}); 95% Wilson intervals")
    if not st.empty:
        routed = list(dict.fromkeys(st.model))
        conds = list(dict.fromkeys(st.condition))
        w = 0.8 / len(conds)
        for i, c in enumerate(conds):
            g = st[st.condition == c].set_index("model").reindex(routed)
            ax2.bar([j + (i - len(conds) / 2 + 0.5) * w for j in range(len(routed))], g.entropy, w, label=c)
        ax2.axhline(float(st.entropy_max.iloc[0]), color="k", ls="--", lw=1, label="log C (uniform)")
        ax2.set_xticks(range(len(routed)), routed, rotation=30, ha="right")
        ax2.set_ylabel("mean coupling entropy (nats)")
        ax2.set_ylim(0, 1.25 * float(st.entropy_max.iloc[0]))  # headroom for the legend
        ax2.legend(fontsize=8, ncol=2, loc="upper center")
        ax2.set_title("Does routing route? Coupling entropy")
    fig.tight_layout()
    return fig
