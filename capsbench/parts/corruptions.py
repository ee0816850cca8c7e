"""The corruptions part: accuracy under the 15 MNIST-C corruptions (Mu & Gilmer 2019), generated in
torch at the released severity (``capsbench/data/corruptions``) or read from the released folders,
with the corruption error of Hendrycks & Dietterich 2019 against a baseline model:
CE_c = E_c / E_c(baseline), relative CE_c = (E_c - E_clean) / (E_c(baseline) - E_clean(baseline)),
mCE = the mean over corruptions."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.data.augment import center_canvas, to_float
from capsbench.data.corruptions import CORRUPTIONS, NAMES, corrupt
from capsbench.data.mnist_c import load_mnist_c
from capsbench.parts.affine import add_counts, batches, correct_counts
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.parts.tally import Counts, Tally
from capsbench.report.format import format_accuracy, markdown_table
from capsbench.report.headline import Headline
from capsbench.report.plots import with_intervals
from capsbench.report.stats import wilson_interval

COLUMNS = ("model", "corruption", "n", "correct", "accuracy", "ci_low", "ci_high", "error", "ce", "relative_ce",
           "seed", "source")  # fmt: skip
CORRUPTIONS_TABLES = {"corruptions": COLUMNS}
MEAN = "mean"  # the row of each model's mean over corruptions: accuracy, mCE, relative mCE


@dataclass(frozen=True)
class CorruptionsConfig:
    n: int = opt(10000, ge=1)  # test digits per corruption (the first n; MNIST-C's test set is MNIST's, in order)
    corruptions: list[str] = opt(factory=lambda: list(NAMES), nonempty=True)  # MNIST-C names (default: all 15)
    batch_size: int = opt(500, ge=1)
    mnist_c_path: str = ""  # "" = generate in torch; else the released mnist_c folder, evaluated instead
    baseline: str = "cnn-pooled"  # the CE denominator's model; absent from the run = no CE columns

    def validate(self, where: str) -> None:
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if unknown:
            raise CapsbenchError(f"{where}.corruptions: unknown {unknown[0]!r}; known: {', '.join(NAMES)}")
        if len(set(self.corruptions)) != len(self.corruptions):
            raise CapsbenchError(f"{where}.corruptions lists a corruption twice: {self.corruptions}")
        if self.mnist_c_path and not Path(self.mnist_c_path).is_dir():
            raise CapsbenchError(f"{where}.mnist_c_path {self.mnist_c_path} is not a folder; give the unzipped "
                                 "mnist_c folder, or leave it empty to generate the corruptions in torch")  # fmt: skip


SIZING = {"smoke": dict(n=64, batch_size=64), "quick": dict(n=500), "standard": dict(n=2000)}
HEADLINE = [Headline("MNIST-C mean %", "mnist_c_mean_accuracy", "corruptions", {"corruption": MEAN},
                     about="MNIST-C: mean accuracy over the corruptions (its interval uses one corruption's n: "
                           "conservative, the sets share their digits).")]  # fmt: skip


def model_inputs(ctx: RunContext, x: Tensor) -> Tensor:
    """28x28 images (B, 1, 28, 28) in [0, 1] -> the models' inputs: as they are, or centred on the canvas."""
    cfg = ctx.train_cfg
    return center_canvas(x, cfg.canvas) if cfg.augment == "canvas" else x


def generated(ctx: RunContext, cfg: CorruptionsConfig, name: str, n: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(corrupted 28x28 images, labels) batch by batch, image i drawn from (seed, name, i)."""
    for i, j in batches(n, cfg.batch_size):
        yield corrupt(name, to_float(ctx.test_x[i:j]), ctx.seed, start=i), ctx.test_y[i:j]


def released(ctx: RunContext, cfg: CorruptionsConfig, name: str, n: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(released images as floats, labels) of the first n images of ``name``, batch by batch."""
    x_all, y_all = load_mnist_c(cfg.mnist_c_path, name)  # (N, 1, 28, 28) uint8, (N,) on the CPU
    for i, j in batches(min(n, len(x_all)), cfg.batch_size):
        yield x_all[i:j].to(ctx.device).float().div_(255.0), y_all[i:j].to(ctx.device)


def evaluate(ctx: RunContext, cfg: CorruptionsConfig, n: int) -> tuple[Counts, dict[str, bool]]:
    """Every model's correct counts on the clean digits and under each corruption (keys
    (corruption, model)); and, for released data, whether its labels match the run's test labels."""
    tally, labels_match = Tally(), {}
    for i, j in batches(n, cfg.batch_size):
        add_counts(tally, ("clean",), correct_counts(ctx, ctx.test_inputs(ctx.test_x[i:j]), ctx.test_y[i:j]), j - i)
    for name in tqdm(cfg.corruptions, desc="corruptions", unit="corruption", disable=not ctx.progress,
                     file=sys.stderr):  # fmt: skip
        source, k = (released if cfg.mnist_c_path else generated)(ctx, cfg, name, n), 0
        for x, y in source:
            tally.span(x)
            add_counts(tally, (name,), correct_counts(ctx, model_inputs(ctx, x), y), len(y))
            if cfg.mnist_c_path:
                labels_match[name] = labels_match.get(name, True) and torch.equal(y, ctx.test_y[k : k + len(y)])
            k += len(y)
    return tally.read(), labels_match


def rows(ctx: RunContext, cfg: CorruptionsConfig, counts: Counts) -> pd.DataFrame:
    """The flat rows: clean and one per corruption per model, without CE yet."""
    out = []
    for (name, model), c in counts.values.items():
        n = counts.n[(name, model)]
        lo, hi = wilson_interval(c["correct"], n)
        src = "mnist" if name == "clean" else ("released" if cfg.mnist_c_path else "torch")
        acc = c["correct"] / n
        out.append({"model": model, "corruption": name, "n": n, "correct": c["correct"], "accuracy": acc,
                    "ci_low": lo, "ci_high": hi, "error": 1 - acc, "seed": ctx.seed, "source": src})
    return pd.DataFrame(out)


def add_ce(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """CE and relative CE per row against ``baseline``'s rows (NaN where it is absent, or where a
    denominator is 0: the baseline made no errors, or none beyond its clean ones)."""
    if baseline not in set(df.model):
        return df.assign(ce=math.nan, relative_ce=math.nan)
    err = df.set_index(["model", "corruption"]).error
    base = df.corruption.map(err.xs(baseline))  # (rows,) the baseline's error on each row's corruption
    clean = df.model.map(err.xs("clean", level="corruption"))
    base_clean = err[(baseline, "clean")]
    ce = df.error / base.where(base > 0)
    rel = (df.error - clean) / (base - base_clean).where(lambda d: d != 0)
    return df.assign(ce=ce.where(df.corruption != "clean"), relative_ce=rel.where(df.corruption != "clean"))


def mean_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each model's mean over its corruptions: accuracy, error, mCE, relative mCE; n = the smallest
    per-corruption n, correct = the mean count (its Wilson interval: conservative)."""
    out = []
    for model, g in df[df.corruption != "clean"].groupby("model", sort=False):
        n, correct = int(g.n.min()), float(g.correct.mean())
        lo, hi = wilson_interval(correct, n)
        out.append({"model": model, "corruption": MEAN, "n": n, "correct": correct, "accuracy": g.accuracy.mean(),
                    "ci_low": lo, "ci_high": hi, "error": g.error.mean(), "ce": g.ce.mean(),
                    "relative_ce": g.relative_ce.mean(), "seed": g.seed.iloc[0],
                    "source": g.source.iloc[0]})  # fmt: skip
    return pd.DataFrame(out)


@part("corruptions", CorruptionsConfig, CORRUPTIONS_TABLES, sizing=SIZING, headline=HEADLINE)
def run_corruptions(ctx: RunContext, cfg: CorruptionsConfig) -> PartResult:
    n = min(cfg.n, len(ctx.test_x))
    if n == 0:
        raise CapsbenchError("the corruptions part needs test digits; the run's test set is empty (test_n)")
    counts, labels_match = evaluate(ctx, cfg, n)
    df = add_ce(rows(ctx, cfg, counts), cfg.baseline)
    df = pd.concat([df, mean_rows(df)], ignore_index=True)[list(COLUMNS)]
    checks = [Check("corruptions: corrupted pixels within [0, 1]", bool(counts.lo >= 0 and counts.hi <= 1),
                    f"min {counts.lo:.4g}, max {counts.hi:.4g} over {counts.spanned} images")]  # fmt: skip
    checks += [Check(f"corruptions: released {name} labels equal the run's MNIST test labels", ok,
                     "MNIST-C's test set is MNIST's test set in order; a mismatch means another order or subset")
               for name, ok in labels_match.items()]  # fmt: skip
    figures = {"corruptions_accuracy": accuracy_figure(df), "corruptions_examples": examples_figure(ctx, cfg)}
    return PartResult({"corruptions": df}, figures, summary(df, ctx, cfg, n), checks)


def accuracy_figure(df: pd.DataFrame) -> Figure:
    """Accuracy per corruption (clean first, the mean last), one bar per model, 95% Wilson intervals."""
    d = with_intervals(df)
    order = list(dict.fromkeys(d.corruption))
    models = list(dict.fromkeys(d.model))
    colors = dict(zip(models, sns.color_palette("colorblind", len(models))))
    fig = Figure(figsize=(max(8.0, 0.75 * len(order) + 2), 4.8))
    ax = fig.subplots()
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        g = d[d.model == m].set_index("corruption").reindex(order)
        xs = [i + k * width for i in range(len(order))]
        ax.bar(xs, g.pct, width, label=m, color=colors[m], yerr=[g.pct - g.lo, g.hi - g.pct], capsize=2)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(order))], order, rotation=45, ha="right")
    ax.set(ylabel="accuracy (%)", ylim=(0, 102), title="MNIST-C: accuracy per corruption (95% Wilson intervals)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def examples_figure(ctx: RunContext, cfg: CorruptionsConfig) -> Figure:
    """The first test digit, clean and under every corruption (the 28x28 images evaluated)."""
    images = [("clean", to_float(ctx.test_x[:1]))]
    for name in cfg.corruptions:
        x = next(released(ctx, cfg, name, 1))[0] if cfg.mnist_c_path else corrupt(name, images[0][1], ctx.seed)
        images.append((name, x))
    cols = min(8, len(images))
    fig = Figure(figsize=(1.6 * cols, 1.8 * math.ceil(len(images) / cols) + 0.4))
    axes = fig.subplots(math.ceil(len(images) / cols), cols, squeeze=False).ravel()
    for ax, (name, x) in zip(axes, images):
        ax.imshow(x[0, 0].float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    src = f"released ({cfg.mnist_c_path})" if cfg.mnist_c_path else f"generated in torch, seed {ctx.seed}"
    fig.suptitle(f"MNIST-C corruptions of test digit 0 (label {int(ctx.test_y[0])}), {src}", fontsize=10)
    return fig


def summary(df: pd.DataFrame, ctx: RunContext, cfg: CorruptionsConfig, n: int) -> str:
    src = (f"the released MNIST-C images from `{cfg.mnist_c_path}`" if cfg.mnist_c_path else
           f"generated in torch from the first {n} test digits at the released severity, seed {ctx.seed} "
           "(differences from the reference code: docs/corruptions.md)")  # fmt: skip
    out = ["## MNIST-C corruptions", "",
           f"- {len(cfg.corruptions)} corruptions (Mu & Gilmer 2019), {src}; clean = the same digits uncorrupted",
           "- accuracy with 95% Wilson intervals; CE = error / the baseline's error on that corruption, relative "
           "CE = (error - clean error) / (baseline error - baseline clean error) (Hendrycks & Dietterich 2019); "
           "mCE = mean CE over the corruptions (one severity each)"]  # fmt: skip
    if ctx.input_size != 28:
        out.append(f"- the models take {ctx.input_size}x{ctx.input_size} inputs: each corrupted 28x28 image is centred "
                   "on the zero canvas (brightness, fog and stripe then cover only the middle)")  # fmt: skip
    if cfg.baseline not in set(df.model):
        out.append(f"- CE columns empty: the baseline model `{cfg.baseline}` is not in this run (set "
                   "`corruptions.baseline` to one of its models)")  # fmt: skip
    out += ["", markdown_table(overview(df)), "", markdown_table(per_corruption(df)), ""]
    return "\n".join(out)


def overview(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model: clean accuracy, mean corrupted accuracy, mCE and relative mCE."""
    means, clean = (df[df.corruption == c].set_index("model") for c in (MEAN, "clean"))
    models = list(means.index)
    return pd.DataFrame({"model": models,
                         "clean [95% CI]": [format_accuracy(clean.accuracy[m], int(clean.n[m])) for m in models],
                         "mean corrupted accuracy": [f"{100 * a:.1f}%" for a in means.accuracy],
                         "mCE": [pct(v) for v in means.ce],
                         "relative mCE": [pct(v) for v in means.relative_ce]})  # fmt: skip


def per_corruption(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy [95% CI] per corruption (rows) and model (columns)."""
    per = df[~df.corruption.isin(["clean", MEAN])]
    cells = {"corruption": list(dict.fromkeys(per.corruption))}
    for model, g in per.groupby("model", sort=False):
        g = g.set_index("corruption")
        cells[model] = [format_accuracy(g.accuracy[c], int(g.n[c])) for c in cells["corruption"]]
    return pd.DataFrame(cells)


def pct(v: float) -> str:
    return "–" if pd.isna(v) else f"{100 * v:.1f}%"
