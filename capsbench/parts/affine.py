"""The affine part (affNIST-style, after Sabour et al. 2017, section 5.2): clean accuracy on
centred digits, one sweep per affine factor with the others at identity, a composite
random-affine set of K copies per digit (affNIST has 32), and the real affNIST test set
(Tieleman 2013) when a path to it is given. Every model sees the same transformed tensors."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.core.seeds import derive_seed
from capsbench.data.affnist import load_affnist
from capsbench.data.transforms import IDENTITY, UNITS, affine_from_uniforms, single_factor
from capsbench.models.scoring import count_correct
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.parts.tally import Counts, Tally
from capsbench.report.format import format_accuracy, markdown_table
from capsbench.report.headline import Headline
from capsbench.report.plots import example_grid, with_intervals

FACTORS = ("rotation", "scale", "shear", "translation")
MNIST_BOX = 20  # MNIST digits are size-normalised into a 20x20 box inside the 28x28 frame
COMPOSITE_COLUMNS = ("rotation_range", "shear_range", "scale_lo", "scale_hi", "copies")
ORIENTATION_N = 2000  # affNIST images used to check the reader's orientation


@dataclass(frozen=True)
class AffineConfig:
    n: int = opt(1000, ge=1)  # test digits for the per-factor sweeps (the first n)
    rotation: list[float] = opt(factory=lambda: [0.0, 10.0, 20.0, 30.0, 45.0, 60.0], ge=-180, le=180,
                                nonempty=True)  # degrees, CCW
    scale: list[float] = opt(factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5], gt=0, finite=True, nonempty=True)  # > 1 enlarges
    shear: list[float] = opt(factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], finite=True, nonempty=True)  # x' = x + s*y
    translation: list[float] = opt(factory=lambda: [0.0, 2.0, 4.0, 6.0, 8.0], finite=True,
                                   nonempty=True)  # pixels, to the right (at most (S - 20) / 2: check_translation)
    composite_n: int = opt(1000, ge=1)  # test digits for the composite set
    copies: int = opt(32, ge=1)  # random transforms per digit (affNIST: 32)
    rotation_range: float = opt(20.0, ge=0)  # composite: rotation uniform in +-rotation_range degrees
    shear_range: float = opt(0.2, ge=0)  # composite: shear uniform in +-shear_range
    scale_range: tuple[float, float] = (0.8, 1.2)  # composite: scale uniform in [lo, hi]
    translate: bool = True  # composite: random translation keeping the digit inside the canvas
    affnist_path: str = ""  # real affNIST .mat file or folder; empty = no affNIST row (never faked)
    batch_size: int = opt(256, ge=1)

    def validate(self, where: str) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise CapsbenchError(
                f"{where}.scale_range must be [lo, hi] with 0 < lo <= hi"
                f"{' (range reversed)' if lo > hi > 0 else ''}, got {list(self.scale_range)}"
            )
        if self.affnist_path and not Path(self.affnist_path).exists():
            raise CapsbenchError(f"{where}.affnist_path {self.affnist_path} does not exist; give the affNIST "
                                 "test .mat file or folder, or leave it empty")  # fmt: skip


def translation_limit(size: int) -> float:
    """Largest sweep translation (px) on a size x size input: (S - 20) / 2, MNIST's 20 px digit box."""
    return (size - MNIST_BOX) / 2


def check_translation(cfg: AffineConfig, size: int, where: str = "affine") -> None:
    """Refuse sweep translations that push a centred 20x20 digit box off a size x size input."""
    limit = translation_limit(size)
    largest = max(abs(v) for v in cfg.translation)
    if largest > limit:
        raise CapsbenchError(
            f"{where}.translation: {largest:g} px is more than {limit:g} px = (S - 20) / 2 for {size}x{size} "
            f"inputs (MNIST digits fill a 20x20 box); use values <= {limit:g}"
        )


def correct_counts(ctx: RunContext, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Every model's number of correct predictions on ``x`` (0-dim device tensors, no sync)."""
    return {name: count_correct(tm.model, x, y, dtype=ctx.dtype) for name, tm in ctx.models.items()}


def add_counts(tally: Tally, key: tuple, counts: dict[str, Tensor], n: int) -> None:
    """Add each model's count over ``n`` images to ``tally`` under ``key + (model,)``."""
    for model, c in counts.items():
        tally.add((*key, model), n, correct=c)


def batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def sweep(ctx: RunContext, cfg: AffineConfig, n: int, tally: Tally) -> None:
    """Clean and single-factor accuracy on the first n digits (each batch transformed once)."""
    jobs = [("clean", math.nan)] + [(f, float(v)) for f in FACTORS for v in getattr(cfg, f)]
    for i, j in tqdm(batches(n, cfg.batch_size), desc="affine sweeps", unit="batch",
                     disable=not ctx.progress, file=sys.stderr):  # fmt: skip
        x, y = ctx.test_inputs(ctx.test_x[i:j]), ctx.test_y[i:j]  # (B, 1, S, S)
        for factor, value in jobs:
            xt = x if factor == "clean" else single_factor(x, factor, value)
            if factor != "clean":
                tally.span(xt)
            add_counts(tally, (factor, value), correct_counts(ctx, xt, y), j - i)


def composite_uniforms(seed: int, copy: int, n: int) -> Tensor:
    """(n, 5) uniforms of copy ``copy`` of the composite set: a CPU generator per copy, so the set
    depends on (seed, copy) only, not on the batch size or the device."""
    g = torch.Generator().manual_seed(derive_seed(seed, copy))
    return torch.rand(n, 5, generator=g)


def composite_batch(ctx: RunContext, cfg: AffineConfig, i: int, j: int, u: Tensor) -> tuple[Tensor, dict]:
    """Digits i..j of one composite copy whose uniforms are ``u`` (n, 5)."""
    x = ctx.test_inputs(ctx.test_x[i:j])
    return affine_from_uniforms(x, u[i:j], cfg.rotation_range, cfg.shear_range, cfg.scale_range, cfg.translate)


def composite(ctx: RunContext, cfg: AffineConfig, n: int, tally: Tally) -> Tensor:
    """n digits x K random affine copies, generated once per batch and shown to every model.
    Returns the number of images whose digit did not fit (translation 0 on some axis)."""
    misfits = torch.zeros((), dtype=torch.long, device=ctx.device)
    chunks = batches(n, cfg.batch_size)
    bar = tqdm(total=cfg.copies * len(chunks), desc="affine composite", unit="batch",
               disable=not ctx.progress, file=sys.stderr)  # fmt: skip
    for k in range(cfg.copies):
        u = composite_uniforms(ctx.seed, k, n)
        for i, j in chunks:
            x, p = composite_batch(ctx, cfg, i, j, u)
            tally.span(x)
            misfits += (~p["fits"]).sum()
            add_counts(tally, ("composite", math.nan), correct_counts(ctx, x, ctx.test_y[i:j]), j - i)
            bar.update()
    bar.close()
    return misfits


def affnist(ctx: RunContext, cfg: AffineConfig, tally: Tally) -> None:
    """Real affNIST accuracy into ``tally``, and the orientation check's counts (keys
    ("orientation", "as read" or "transposed", model)): on the first ORIENTATION_N images,
    correct as read and with every image transposed."""
    x_all, y_all = load_affnist(cfg.affnist_path)  # (N, 40, 40) uint8, (N,) int64 on the CPU
    m = min(ORIENTATION_N, len(x_all))
    for i, j in tqdm(batches(len(x_all), cfg.batch_size), desc="affNIST", unit="batch",
                     disable=not ctx.progress, file=sys.stderr):  # fmt: skip
        x = x_all[i:j].to(ctx.device).unsqueeze(1).float().div_(255.0)  # (B, 1, 40, 40)
        y = y_all[i:j].to(ctx.device)
        k = max(0, min(j, m) - i)  # images of this batch inside the orientation sample
        if k:
            head = correct_counts(ctx, x[:k], y[:k])
            add_counts(tally, ("affnist", math.nan), head, k)
            add_counts(tally, ("orientation", "as read"), head, k)
            add_counts(tally, ("orientation", "transposed"), correct_counts(ctx, x[:k].transpose(-1, -2), y[:k]), k)
        if k < j - i:
            add_counts(tally, ("affnist", math.nan), correct_counts(ctx, x[k:], y[k:]), j - i - k)


AFFINE_TABLES = {
    "affine": ("model", "transform", "value", "accuracy", "n", "seed", "correct", *COMPOSITE_COLUMNS),
}


GRIDS = dict(rotation=[0.0, 15.0, 30.0, 45.0, 60.0], scale=[0.6, 0.8, 1.0, 1.2], shear=[0.0, 0.2, 0.4],
             translation=[0.0, 2.0, 4.0])  # the reduced presets' sweeps
SIZING = {
    "smoke": dict(n=64, composite_n=16, copies=2, rotation=[0.0, 30.0], scale=[1.0, 1.2], shear=[0.0, 0.3],
                  translation=[0.0, 3.0]),
    "quick": dict(n=500, composite_n=200, copies=4, batch_size=100, **GRIDS),
    "standard": dict(n=1000, composite_n=500, copies=4, batch_size=250, **GRIDS),
}  # fmt: skip
HEADLINE = [Headline("composite %", "composite_accuracy", "affine", {"transform": "composite"},
                     about="Composite: the affNIST-style composite affine set.")]  # fmt: skip


@part("affine", AffineConfig, AFFINE_TABLES, sizing=SIZING, headline=HEADLINE)
def run_affine(ctx: RunContext, cfg: AffineConfig) -> PartResult:
    S = ctx.input_size
    check_translation(cfg, S)
    n, cn = min(cfg.n, len(ctx.test_x)), min(cfg.composite_n, len(ctx.test_x))
    if n == 0:
        raise CapsbenchError("the affine part needs test digits; the run's test set is empty (test_n)")
    tally = Tally()
    sweep(ctx, cfg, n, tally)
    misfits = composite(ctx, cfg, cn, tally)
    if cfg.affnist_path and S == 40:
        affnist(ctx, cfg, tally)
    df, host = table(ctx, cfg, tally.read(misfits))
    checks = identity_checks(df) + [pixel_check(host)] + composite_checks(df) + orientation_checks(host["orientation"])
    figures = {"affine_sweeps": sweeps_figure(df, S, n), "affine_composite": composite_figure(df, cfg),
               "affine_examples": examples_figure(ctx, cfg, n, cn)}  # fmt: skip
    return PartResult({"affine": df}, figures, summary(df, ctx, cfg, n, host), checks)


def table(ctx: RunContext, cfg: AffineConfig, counts: Counts) -> tuple[pd.DataFrame, dict]:
    """The flat rows, and the numbers the checks and the summary need, from the tally read back
    (``counts.extra``: the composite misfits)."""
    comp = dict(zip(COMPOSITE_COLUMNS, (cfg.rotation_range, cfg.shear_range, *cfg.scale_range, cfg.copies)))
    rows, found = [], {}
    for (transform, value, model), c in counts.values.items():
        n = counts.n[(transform, value, model)]
        if transform == "orientation":
            found[(value, model)] = (c["correct"], n)  # value: "as read" or "transposed"
            continue
        row = {"model": model, "transform": transform, "value": value, "accuracy": c["correct"] / n, "n": n,
               "seed": ctx.seed, "correct": c["correct"]}  # fmt: skip
        rows.append({**row, **(comp if transform == "composite" else dict.fromkeys(comp, math.nan))})
    oriented = {m: (found[("as read", m)][0], found[("transposed", m)][0], n)
                for (how, m), (_, n) in found.items() if how == "as read"}  # fmt: skip
    host = {"misfits": counts.extra[0], "lo": counts.lo, "hi": counts.hi, "pixels_n": counts.spanned,
            "orientation": oriented}  # fmt: skip
    return pd.DataFrame(rows, columns=AFFINE_TABLES["affine"]), host


def identity_checks(df: pd.DataFrame) -> list[Check]:
    """Identity parameters must give exactly the clean count (the transform returns the input)."""
    checks = []
    for model, g in df.groupby("model", sort=False):
        clean = g[g["transform"] == "clean"].iloc[0]
        for factor in FACTORS:
            ident = g[(g["transform"] == factor) & (g["value"] == IDENTITY[factor])]
            if not ident.empty:
                r = ident.iloc[0]
                checks.append(Check(f"affine {model}: {factor} {IDENTITY[factor]:g} equals clean exactly",
                                    bool(r.correct == clean.correct),
                                    f"{r.correct}/{r.n} vs clean {clean.correct}/{clean.n}"))  # fmt: skip
    return checks


def pixel_check(host: dict) -> Check:
    ok = host["lo"] >= 0 and host["hi"] <= 1
    return Check("affine: transformed pixels within [0, 1]", bool(ok),
                 f"min {host['lo']:.4g}, max {host['hi']:.4g} over {host['pixels_n']} transformed images")  # fmt: skip


def composite_checks(df: pd.DataFrame) -> list[Check]:
    checks = []
    for model, g in df.groupby("model", sort=False):
        clean = g[g["transform"] == "clean"].iloc[0]
        comp = g[g["transform"] == "composite"].iloc[0]
        checks.append(Check(f"affine {model}: composite accuracy <= clean (informational)",
                            bool(comp.accuracy <= clean.accuracy),
                            f"composite {100 * comp.accuracy:.1f}% (n={comp.n}) vs clean {100 * clean.accuracy:.1f}% "
                            f"(n={clean.n})"))  # fmt: skip
    return checks


def orientation_checks(orient: dict[str, tuple[int, int, int]]) -> list[Check]:
    """A model trained on upright digits does better on upright affNIST than on its transpose."""
    return [
        Check(f"affine {m}: affNIST orientation (as read >= transposed)", a >= b,
              f"first {n} images: {100 * a / n:.1f}% as read vs {100 * b / n:.1f}% transposed; if transposed "
              "wins, the reader's orientation (capsbench/data/affnist.py) is wrong")  # fmt: skip
        for m, (a, b, n) in orient.items()
    ]


def sweeps_figure(df: pd.DataFrame, S: int, n: int) -> Figure:
    fig = Figure(figsize=(12, 8.5))
    axes = fig.subplots(2, 2).ravel()
    d = with_intervals(df)
    models = list(dict.fromkeys(d.model))
    colors = dict(zip(models, sns.color_palette("colorblind", len(models))))
    for ax, factor in zip(axes, FACTORS):
        for m in models:
            g = d[(d.model == m) & (d["transform"] == factor)].sort_values("value")
            ax.errorbar(g.value, g.pct, yerr=[g.pct - g.lo, g.hi - g.pct], marker="o", ms=4, capsize=3,
                        color=colors[m], label=m)  # fmt: skip
            clean = d[(d.model == m) & (d["transform"] == "clean")].pct.iloc[0]
            ax.axhline(clean, color=colors[m], linestyle=":", linewidth=1)
        ax.set(xlabel=f"{factor} ({UNITS[factor]})", ylabel="accuracy (%)", ylim=(-2, 102),
               title=f"{factor}, other factors at identity")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="dotted: clean", title_fontsize=7)
    fig.suptitle(f"Accuracy under one affine factor at a time ({S}x{S} inputs, first {n} test digits, "
                 "bilinear resampling; 95% Wilson intervals)")  # fmt: skip
    fig.tight_layout()
    return fig


def composite_figure(df: pd.DataFrame, cfg: AffineConfig) -> Figure:
    d = with_intervals(df[df["transform"].isin(["clean", "composite", "affnist"])])
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    sets = [t for t in ("clean", "composite", "affnist") if t in set(d["transform"])]
    models = list(dict.fromkeys(d.model))
    colors = dict(zip(sets, sns.color_palette("colorblind", len(sets))))
    width = 0.8 / len(sets)
    for k, t in enumerate(sets):
        g = d[d["transform"] == t].set_index("model").reindex(models)
        xs = [i + k * width for i in range(len(models))]
        label = {"clean": "clean (centred)", "composite": f"composite ({cfg.copies} copies)", "affnist": "affNIST"}[t]
        ax.bar(xs, g.pct, width, label=label, color=colors[t], yerr=[g.pct - g.lo, g.hi - g.pct], capsize=3)
    ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(models))], models)
    lo, hi = cfg.scale_range
    ax.set(ylabel="accuracy (%)", ylim=(0, 102), xlabel="model",
           title=f"Clean vs affNIST-style composite (rotation +-{cfg.rotation_range:g} deg, shear "
                 f"+-{cfg.shear_range:g}, scale {lo:g}-{hi:g}); 95% Wilson intervals")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return fig


def examples_figure(ctx: RunContext, cfg: AffineConfig, n: int, cn: int) -> Figure:
    """The first digits: clean, each factor at its most extreme sweep value, composite copies 0-1."""
    k = min(6, n, cn)
    x = ctx.test_inputs(ctx.test_x[:k])
    rows, names = [x], ["clean"]
    for f in FACTORS:
        v = max(getattr(cfg, f), key=lambda v: abs(v - IDENTITY[f]))
        rows.append(single_factor(x, f, v))
        names.append(f"{f} {v:g}")
    for copy in range(min(2, cfg.copies)):
        rows.append(composite_batch(ctx, cfg, 0, k, composite_uniforms(ctx.seed, copy, cn))[0])
        names.append(f"composite #{copy}")
    labels = [[f"label {int(v)}" for v in ctx.test_y[:k].tolist()] for _ in rows]
    S = ctx.input_size
    return example_grid(rows, names, labels, title=f"Affine test transforms on {S}x{S} inputs (the images evaluated)")


def summary(df: pd.DataFrame, ctx: RunContext, cfg: AffineConfig, n: int, host: dict) -> str:
    S, lo, hi = ctx.input_size, *cfg.scale_range
    clean_what = f"digits centred on the {S}x{S} canvas (\"expanded MNIST\")" if S > 28 else "unshifted 28x28 digits"
    n_comp = int(df[df["transform"] == "composite"].n.iloc[0])
    trans = ("uniform per axis within the range that keeps the transformed digit (plus the bilinear kernel's "
             "reach) inside the canvas, 0 on an axis where it does not fit"
             f" ({host['misfits']} of {n_comp} images)") if cfg.translate else "none"  # fmt: skip
    out = [
        "## Affine (affNIST-style)",
        "",
        f"- inputs {S}x{S}; clean = {clean_what}; sweeps on the first {n} test digits, one factor at a time with "
        "the others at identity (bilinear resampling, zero padding, pixels clamped to [0, 1]); rotation in "
        "degrees counter-clockwise, scale > 1 enlarges, shear x' = x + s*y, "
        f"translation in pixels to the right (at most (S - 20) / 2 = {translation_limit(S):g} px)",
        f"- composite affNIST-style set: {n_comp // cfg.copies} digits x {cfg.copies} random transforms, drawn once "
        f"from seed {ctx.seed} (the same images for every model): rotation U[-{cfg.rotation_range:g}, "
        f"{cfg.rotation_range:g}] deg, shear U[-{cfg.shear_range:g}, {cfg.shear_range:g}], scale U[{lo:g}, {hi:g}], "
        f"translation {trans}",
    ]
    if cfg.affnist_path and S != 40:
        out += [f"- real affNIST (`{cfg.affnist_path}`) skipped: it is 40x40 and these models take {S}x{S} inputs"]
    elif cfg.affnist_path:
        n_aff = int(df[df["transform"] == "affnist"].n.iloc[0])
        out += [f"- real affNIST: {n_aff} images from `{cfg.affnist_path}`, columns read row-major"]
    else:
        out += ["- real affNIST: not evaluated (set `affine.affnist_path`); no row is reported for it"]
    out += ["- accuracies with 95% Wilson intervals; checks (identity = clean, pixels in [0, 1], composite <= clean) "
            "are under Sanity checks", ""]  # fmt: skip
    for model, g in df.groupby("model", sort=False):
        cells = [{"transform": t, "value": "" if math.isnan(v) else f"{v:g}",
                  "accuracy [95% CI]": format_accuracy(a, int(k))}
                 for t, v, a, k in zip(g["transform"], g["value"], g.accuracy, g.n)]  # fmt: skip
        out += [f"### {model}", "", markdown_table(pd.DataFrame(cells)), ""]
    return "\n".join(out)
