"""The affine part (affNIST-style): clean accuracy on centred digits, one sweep per affine
factor with the others at identity, a composite random-affine set with K copies per digit
(affNIST uses 32), and the real affNIST test set when a path to it is given."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.affnist import load_affnist
from capsbench.device import autocast
from capsbench.errors import CapsbenchError
from capsbench.models import predict
from capsbench.plots import accuracy_lines, example_grid, with_intervals
from capsbench.stats import format_accuracy
from capsbench.suites.base import PARTS, Check, PartResult, RunContext
from capsbench.summary import markdown_table
from capsbench.transforms import IDENTITY, UNITS, random_affine, single_factor

FACTORS = ("rotation", "scale", "shear", "translation")


@dataclass(frozen=True)
class AffineConfig:
    n: int = 1000  # test digits for the per-factor sweeps (the first n)
    rotation: list[float] = field(default_factory=lambda: [0.0, 10.0, 20.0, 30.0, 45.0, 60.0])  # degrees
    scale: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5])
    shear: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    translation: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 6.0, 8.0])  # pixels, to the right
    composite_n: int = 1000  # test digits for the composite set
    copies: int = 32  # random transforms per digit (affNIST: 32)
    rotation_range: float = 20.0  # composite: rotation uniform in +-rotation_range degrees
    shear_range: float = 0.2
    scale_range: tuple[float, float] = (0.8, 1.2)
    translate: bool = True  # composite: random translation keeping the digit inside the canvas
    affnist_path: str = ""  # real affNIST .mat file or folder; empty = no affNIST row
    batch_size: int = 256

    def validate(self, where: str) -> None:
        for key in ("n", "composite_n", "copies", "batch_size"):
            if getattr(self, key) < 1:
                raise CapsbenchError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        for key in FACTORS:
            if not getattr(self, key):
                raise CapsbenchError(f"{where}.{key} needs at least one value")
        if any(abs(v) > 180 for v in self.rotation):
            raise CapsbenchError(f"{where}.rotation values must be within [-180, 180] degrees, got {self.rotation}")
        if any(v <= 0 for v in self.scale):
            raise CapsbenchError(f"{where}.scale values must be > 0, got {self.scale}")
        if self.rotation_range < 0 or self.shear_range < 0:
            raise CapsbenchError(f"{where}: rotation_range and shear_range must be >= 0 (they are +- ranges)")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise CapsbenchError(f"{where}.scale_range must be [lo, hi] with 0 < lo <= hi, got {list(self.scale_range)}")


def count_correct(ctx: RunContext, x: Tensor, y: Tensor, totals: dict[str, Tensor]) -> None:
    """Add every model's correct predictions on ``x`` to ``totals`` (device tensors, no sync)."""
    with torch.no_grad(), autocast(ctx.device, ctx.dtype):
        for name, tm in ctx.models.items():
            totals[name] = totals.get(name, 0) + (predict(tm.model(x)) == y).sum()


def sweep(ctx: RunContext, cfg: AffineConfig, n: int) -> dict[tuple[str, float], dict[str, Tensor]]:
    """Correct counts per (factor, value) on the first n digits; ("clean", nan) included."""
    jobs = [("clean", math.nan)] + [(f, float(v)) for f in FACTORS for v in getattr(cfg, f)]
    totals: dict[tuple[str, float], dict[str, Tensor]] = {job: {} for job in jobs}
    for i in tqdm(range(0, n, cfg.batch_size), desc="affine sweeps", unit="batch", disable=not ctx.progress):
        j = min(i + cfg.batch_size, n)
        x, y = ctx.test_inputs(ctx.test_x[i:j]), ctx.test_y[i:j]
        for factor, value in jobs:
            xt = x if factor == "clean" else single_factor(x, factor, value)
            count_correct(ctx, xt, y, totals[(factor, value)])
    return totals


def composite(ctx: RunContext, cfg: AffineConfig, n: int) -> dict[str, Tensor]:
    """Correct counts on n digits x K random affine copies; the same images for every model."""
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    totals: dict[str, Tensor] = {}
    chunks = [(k, i) for k in range(cfg.copies) for i in range(0, n, cfg.batch_size)]
    for k, i in tqdm(chunks, desc="affine composite", unit="batch", disable=not ctx.progress):
        j = min(i + cfg.batch_size, n)
        x, _ = random_affine(ctx.test_inputs(ctx.test_x[i:j]), gen, cfg.rotation_range, cfg.shear_range,
                             cfg.scale_range, cfg.translate)  # fmt: skip
        count_correct(ctx, x, ctx.test_y[i:j], totals)
    return totals


def affnist_counts(ctx: RunContext, cfg: AffineConfig) -> tuple[dict[str, Tensor], int] | None:
    if not cfg.affnist_path or ctx.input_size != 40:
        return None
    x_all, y_all = load_affnist(cfg.affnist_path)
    totals: dict[str, Tensor] = {}
    for i in tqdm(range(0, len(x_all), cfg.batch_size), desc="affNIST", unit="batch", disable=not ctx.progress):
        x = x_all[i : i + cfg.batch_size].to(ctx.device).unsqueeze(1).float() / 255.0
        count_correct(ctx, x, y_all[i : i + cfg.batch_size].to(ctx.device), totals)
    return totals, len(x_all)


def run_affine(ctx: RunContext, cfg: AffineConfig) -> PartResult:
    n, cn = min(cfg.n, len(ctx.test_x)), min(cfg.composite_n, len(ctx.test_x))
    rows = []
    for (factor, value), totals in sweep(ctx, cfg, n).items():
        rows += [_row(m, factor, value, c, n, ctx.seed) for m, c in totals.items()]
    comp = {"rotation_range": cfg.rotation_range, "shear_range": cfg.shear_range, "scale_lo": cfg.scale_range[0],
            "scale_hi": cfg.scale_range[1], "copies": cfg.copies}  # fmt: skip
    rows += [{**_row(m, "composite", math.nan, c, cn * cfg.copies, ctx.seed), **comp} for m, c in composite(ctx, cfg, cn).items()]
    real = affnist_counts(ctx, cfg)
    if real is not None:
        rows += [_row(m, "affnist", math.nan, c, real[1], ctx.seed) for m, c in real[0].items()]
    df = pd.DataFrame(rows)
    for col in comp:
        df[col] = df.get(col, math.nan)
    checks = identity_checks(df, cfg)
    figures = {"affine_sweeps": sweeps_figure(df, ctx), "affine_composite": composite_figure(df),
               "affine_examples": examples_figure(ctx, cfg)}  # fmt: skip
    return PartResult({"affine": df}, figures, summary(df, ctx, cfg, real is not None), checks)


def _row(model: str, transform: str, value: float, correct: Tensor, n: int, seed: int) -> dict:
    c = int(correct.item()) if isinstance(correct, Tensor) else int(correct)
    return {"model": model, "transform": transform, "value": value, "accuracy": c / n, "n": n, "seed": seed, "correct": c}


def identity_checks(df: pd.DataFrame, cfg: AffineConfig) -> list[Check]:
    checks = []
    for model, g in df.groupby("model"):
        clean = g[g["transform"] == "clean"].iloc[0]
        for factor in FACTORS:
            ident = g[(g["transform"] == factor) & (g.value == IDENTITY[factor])]
            if not ident.empty:
                r = ident.iloc[0]
                checks.append(Check(f"{model} {factor}={IDENTITY[factor]:g} equals clean", bool(r.correct == clean.correct),
                                    f"{r.correct}/{r.n} vs clean {clean.correct}/{clean.n}"))  # fmt: skip
        comp = g[g["transform"] == "composite"].iloc[0]
        checks.append(Check(f"{model}: composite affine accuracy <= clean (informational)",
                            bool(comp.accuracy <= clean.accuracy),
                            f"composite {100 * comp.accuracy:.1f}% (n={comp.n}) vs clean {100 * clean.accuracy:.1f}%"))  # fmt: skip
    return checks


def sweeps_figure(df: pd.DataFrame, ctx: RunContext) -> Figure:
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2).ravel()
    for ax, factor in zip(axes, FACTORS):
        accuracy_lines(df[df["transform"] == factor], x="value", hue="model", xlabel=f"{factor} ({UNITS[factor]})",
                       title=f"{factor} (others at identity)", ax=ax)  # fmt: skip
    fig.suptitle(f"Accuracy under single affine factors ({ctx.input_size}x{ctx.input_size} inputs, 95% Wilson bands)")
    fig.tight_layout()
    return fig


def composite_figure(df: pd.DataFrame) -> Figure:
    d = with_intervals(df[df["transform"].isin(["clean", "composite", "affnist"])])
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    sets = list(dict.fromkeys(d["transform"]))
    models = sorted(d.model.unique())
    width = 0.8 / len(sets)
    for k, t in enumerate(sets):
        g = d[d["transform"] == t].set_index("model").loc[models]
        xs = [i + k * width for i in range(len(models))]
        ax.bar(xs, g.pct, width, label=t, yerr=[g.pct - g.lo, g.hi - g.pct], capsize=3)
    ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(models))], models)
    ax.set(ylabel="accuracy (%)", ylim=(0, 102), title="Clean (centred) vs affNIST-style composite accuracy")
    ax.legend()
    return fig


def examples_figure(ctx: RunContext, cfg: AffineConfig) -> Figure:
    k = min(6, len(ctx.test_x))
    x = ctx.test_inputs(ctx.test_x[:k])
    rows, names = [x], ["clean"]
    for f in FACTORS:
        v = max(getattr(cfg, f), key=lambda v: abs(v - IDENTITY[f]))
        rows.append(single_factor(x, f, v))
        names.append(f"{f} {v:g}")
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    rows.append(random_affine(x, gen, cfg.rotation_range, cfg.shear_range, cfg.scale_range, cfg.translate)[0])
    names.append("composite")
    labels = [[str(int(v)) for v in ctx.test_y[:k]] for _ in rows]
    return example_grid(rows, names, labels, title="Affine test transforms (cell title: true label)")


def summary(df: pd.DataFrame, ctx: RunContext, cfg: AffineConfig, has_affnist: bool) -> str:
    S = ctx.input_size
    clean_what = f"digits centred on the {S}x{S} canvas (\"expanded MNIST\")" if S > 28 else "unshifted 28x28 digits"
    out = [
        "## Affine (affNIST-style)",
        "",
        f"Inputs {S}x{S}; clean = {clean_what}. Sweeps on the first {cfg.n} test digits, one factor at a time "
        "(others at identity; bilinear resampling, zero padding, pixels clamped to [0, 1]); translation moves "
        f"the digit right. Composite affNIST-style set: {cfg.composite_n} digits x {cfg.copies} random transforms "
        f"(seed {ctx.seed}): rotation +-{cfg.rotation_range} deg, shear +-{cfg.shear_range}, scale "
        f"{cfg.scale_range[0]}-{cfg.scale_range[1]}, translation {'uniform within the range that keeps the digit inside the canvas' if cfg.translate else 'none'}. "
        "95% Wilson intervals.",
        "",
    ]
    if cfg.affnist_path and not has_affnist:
        out += [f"Real affNIST (`{cfg.affnist_path}`) was not evaluated: it is 40x40 and these models take {S}x{S} inputs.", ""]
    elif not cfg.affnist_path:
        out += ["Real affNIST: not evaluated (set `affine.affnist_path`); no row is reported for it.", ""]
    d = df.assign(cell=[format_accuracy(a, int(n)) for a, n in zip(df.accuracy, df.n)],
                  setting=[t if math.isnan(v) else f"{t} {v:g}" for t, v in zip(df["transform"], df.value)])  # fmt: skip
    piv = d.pivot_table(index="setting", columns="model", values="cell", aggfunc="first", sort=False).reset_index()
    out += [markdown_table(piv), ""]
    return "\n".join(out)


PARTS.register("affine")((AffineConfig, run_affine))
