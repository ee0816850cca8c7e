"""The routing part: does routing route, and does it help? Every model of the run (the routing
heads on CapsNet's backbone, other capsule models, the pooled CNN) under one protocol: clean
accuracy, random sign noise, the affNIST-style composite, the adversarial worst case (AutoAttack
at the preset's budget, then the vote attack of Gu et al. 2021 where the model has votes), and,
for models that return coupling coefficients, routing statistics clean, under noise and on the
adversarial images: the mean coupling entropy (nats; its maximum log C means no routing) and the
share of children whose top parent is the predicted class.

The question is the one Paik et al. (2019) and Gu & Tresp (2020) raised: if uniform couplings do
as well as routing, the robustness of capsules is not routing's.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.attacks import AutoAttack, SignNoise, VoteAttack
from capsbench.core.seeds import derive_seed
from capsbench.models import BenchModel
from capsbench.models.capsule import has_votes
from capsbench.models.scoring import batch_predictions, forward_batches
from capsbench.parts.affine import AffineConfig, composite_batch, composite_uniforms
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.parts.routing_config import SIZING, RoutingConfig
from capsbench.parts.routing_report import MEASURES, routing_figure, summary
from capsbench.report.headline import Headline

CONDITIONS = ("clean", "noise", "adversarial")


ROUTING_TABLES = {
    "routing": ("model", "head", "measure", "eps", "n", "correct", "accuracy", "seed"),
    "routing_stats": ("model", "head", "condition", "n", "entropy", "entropy_max", "agreement", "seed"),
}
HEADLINE = [Headline("routing worst case %", "routing_worst_case_accuracy", "routing", {"measure": "worst-case"},
                     about="Routing worst case: robust under AutoAttack and the vote attack at the routing part's eps.")]  # fmt: skip


@dataclass
class Found:
    """One model's results: correct counts per measure and its routing statistics per condition."""

    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # measure -> (correct, n)
    stats: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # condition -> (n, entropy, agreement)


def head_of(model: BenchModel) -> str:
    """The routing head's name ("-" for models without one)."""
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "routing", "-"))


def routing_stats(model: BenchModel, x: Tensor, batch_size: int) -> tuple[float, float] | None:
    """(mean coupling entropy in nats, share of children whose top parent is the prediction) over
    x (B, 1, S, S), or None when the model returns no couplings. Children whose couplings are all
    equal (uniform routing) have no top parent and are left out of the share (NaN if all are)."""
    ent, agree, decided, total = 0.0, 0.0, 0.0, 0
    for _, out in forward_batches(model, x, batch_size):
        if out.coupling is None:
            return None
        c = out.coupling.float()  # (B, N, C), sums to 1 over C
        ent += float(-(c * c.clamp_min(1e-30).log()).sum(2).mean(1).sum())
        top = c.argmax(2)  # (B, N)
        has_top = (c.amax(2) - c.amin(2)) > 1e-6  # (B, N)
        agree += float(((top == out.scores.argmax(1, keepdim=True)) & has_top).sum())
        decided += float(has_top.sum())
        total += len(c)
    return ent / max(total, 1), (agree / decided if decided else math.nan)


def composite_correct(ctx: RunContext, cfg: RoutingConfig, model: BenchModel) -> tuple[int, int]:
    """Correct predictions on the affNIST-style composite set (the affine part's ranges and
    generator: the same images for every model)."""
    acfg, n = AffineConfig(), min(cfg.composite_n, len(ctx.test_x))
    correct = torch.zeros((), dtype=torch.long, device=ctx.device)
    for k in range(cfg.copies):
        u = composite_uniforms(ctx.seed, k, n)
        for i in range(0, n, cfg.batch_size):
            j = min(i + cfg.batch_size, n)
            x, _ = composite_batch(ctx, acfg, i, j, u)
            correct += (batch_predictions(model, x, cfg.batch_size, ctx.dtype) == ctx.test_y[i:j]).sum()
    return int(correct), n * cfg.copies


def attacked(ctx: RunContext, cfg: RoutingConfig, model: BenchModel, x: Tensor, y: Tensor,
             found: Found) -> Tensor:  # fmt: skip
    """AutoAttack, then the vote attack where the model has votes, on (x, y); counts into
    ``found``; returns the adversarial images (AutoAttack's, the vote attack's where it alone won)."""
    gen = torch.Generator(device=ctx.device).manual_seed(derive_seed(ctx.seed, int(round(cfg.eps * 1000))))
    out = AutoAttack(model, cfg.eps, cfg.budget, ctx.dtype, cfg.batch_size, tuple(cfg.aa_stages))(x, y, gen)
    robust = out.robust_after[cfg.aa_stages[-1]]  # (k,) bool, correct on x and every stage failed
    found.counts["autoattack"] = (int(robust.sum()), len(y))
    adv = out.adv
    if has_votes(model):
        vote_adv = VoteAttack(model, cfg.eps, ctx.dtype, cfg.batch_size, "ce", steps=cfg.vote_steps)(x, y)
        vote_ok = batch_predictions(model, vote_adv, cfg.batch_size, ctx.dtype) == y
        found.counts["vote"] = (int(vote_ok.sum()), len(y))
        adv = torch.where((robust & ~vote_ok).view(-1, 1, 1, 1), vote_adv, adv)
        robust = robust & vote_ok
    found.counts["worst-case"] = (int(robust.sum()), len(y))
    return adv


def evaluate(ctx: RunContext, cfg: RoutingConfig, model: BenchModel) -> Found:
    """Every measure and statistic of one model."""
    found, n, k = Found(), min(cfg.n, len(ctx.test_x)), min(cfg.attack_n, cfg.n, len(ctx.test_x))
    x, y = ctx.test_inputs(ctx.test_x[:n]), ctx.test_y[:n]
    gen = torch.Generator(device=ctx.device).manual_seed(derive_seed(ctx.seed, 1))  # the same noise for every model
    noisy = SignNoise(model, cfg.noise_eps, ctx.dtype, cfg.batch_size)(x, y, gen)
    for measure, imgs in (("clean", x), ("noise", noisy)):
        found.counts[measure] = (int((batch_predictions(model, imgs, cfg.batch_size, ctx.dtype) == y).sum()), n)
    found.counts["composite"] = composite_correct(ctx, cfg, model)
    adv = attacked(ctx, cfg, model, x[:k], y[:k], found)
    for cond, imgs in zip(CONDITIONS, (x[:k], noisy[:k], adv)):
        st = routing_stats(model, imgs, cfg.batch_size)
        if st is not None:
            found.stats[cond] = (k, *st)
    return found


def tables(ctx: RunContext, cfg: RoutingConfig, found: dict[str, Found]) -> dict[str, pd.DataFrame]:
    rows, stats = [], []
    for name, f in found.items():
        head = head_of(ctx.models[name].model)
        for measure in MEASURES:
            if measure in f.counts:
                c, n = f.counts[measure]
                eps = {"noise": cfg.noise_eps, "clean": 0.0, "composite": 0.0}.get(measure, cfg.eps)
                rows.append((name, head, measure, eps, n, c, c / n if n else math.nan, ctx.seed))
        C = ctx.models[name].model.num_classes
        stats += [(name, head, cond, n, e, math.log(C), a, ctx.seed) for cond, (n, e, a) in f.stats.items()]
    return {"routing": pd.DataFrame(rows, columns=ROUTING_TABLES["routing"]),
            "routing_stats": pd.DataFrame(stats, columns=ROUTING_TABLES["routing_stats"])}  # fmt: skip


@part("routing", RoutingConfig, ROUTING_TABLES, sizing=SIZING, headline=HEADLINE)
def run_routing(ctx: RunContext, cfg: RoutingConfig) -> PartResult:
    found = {}
    for name, tm in tqdm(ctx.models.items(), desc="routing", unit="model", disable=not ctx.progress, file=sys.stderr):
        found[name] = evaluate(ctx, cfg, tm.model)
    t = tables(ctx, cfg, found)
    checks = order_checks(t["routing"]) + coupling_checks(t["routing_stats"])
    return PartResult(t, {"routing": routing_figure(t, cfg)}, summary(t, cfg, checks), checks)


def order_checks(df: pd.DataFrame) -> list[Check]:
    """The worst case is at most every attack and the clean accuracy (per model)."""
    out = []
    for name, g in df.groupby("model", sort=False):
        acc = dict(zip(g.measure, g.correct))
        worst = acc.get("worst-case")
        others = [acc[m] for m in ("autoattack", "vote") if m in acc]
        ok = worst is not None and all(worst <= o for o in others)
        n = int(g[g.measure == "worst-case"].n.max()) if worst is not None else 0
        out.append(Check(f"{name}: worst case <= AutoAttack and the vote attack", ok,
                         f"worst {worst}, attacks {others} correct of {n}", model=str(name)))  # fmt: skip
    return out


def coupling_checks(st: pd.DataFrame) -> list[Check]:
    """Mean coupling entropy lies in [0, log C] (couplings are distributions over parents)."""
    out = []
    for name, g in st.groupby("model", sort=False):
        ok = bool(((g.entropy >= -1e-6) & (g.entropy <= g.entropy_max + 1e-5)).all())
        out.append(Check(f"{name}: coupling entropy within [0, log C]", ok,
                         f"{g.entropy.min():.4f} to {g.entropy.max():.4f} nats, log C = {g.entropy_max.iloc[0]:.4f}",
                         model=str(name)))  # fmt: skip
    return out
