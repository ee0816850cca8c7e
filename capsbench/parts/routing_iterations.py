"""The routing-iterations part: the EM paper's ablation of routing iterations (Hinton, Sabour &
Frosst, ICLR 2018, "Matrix capsules with EM routing": smallNORB test error 9.7 / 2.2 / 1.8 / 3.9 %
for 1 / 2 / 3 / 5 EM iterations; one iteration is much worse, 2-3 are best, more does not help).

One capsule model (``routing-iterations.model``: CapsNet with the EM head by default; any model
with a ``routing_iters`` option) is trained once per iteration count of ``routing-iterations.iters``
on the run's dataset under the run's training protocol and seed, then tested on one fixed sample
of ``test_n`` test images: its error with a 95% Wilson interval. Each variant is a model of the
run's cache (``models/<model>-<key>``, the iteration count in its options and so in the key): a
killed run resumes from its last checkpoint and keeps the variants it finished, and the variant
with the model's own iteration count is the run's model when the part trains for the run's length.

Claim ``routing-iterations`` (claims.toml): error(1) - min(error(2), error(3)) > 0, judged on
smallNORB only (the paper's numbers are smallNORB's).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from capsbench.core.config import from_dict, opt
from capsbench.core.errors import CapsbenchError
from capsbench.models import MODELS, count_correct, model_config, model_name, model_options
from capsbench.models.heads import HEADS
from capsbench.parts.base import PartResult, RunContext, part
from capsbench.parts.table1 import CHANCE_FACTOR
from capsbench.parts.viewpoints_train import sample_images
from capsbench.report.format import interval_cell, markdown_table
from capsbench.report.headline import Headline
from capsbench.report.stats import newcombe_interval, wilson_interval
from capsbench.train.cache import TrainedModel
from capsbench.train.config import TrainConfig, data_options
from capsbench.train.tasks import test_inputs

OPTION = "routing_iters"  # the model option the part varies
PAPER_ERROR_PCT = {1: 9.7, 2: 2.2, 3: 1.8, 5: 3.9}  # Hinton et al. 2018, smallNORB, matrix capsules
COLUMNS = ("model", "dataset", "iters", "seed", "n", "errors", "error", "error_pct", "error_low_pct",
           "error_high_pct", "accuracy", "steps", "batch_size", "params", "train_seconds", "from_cache",
           "train_failed")  # fmt: skip
ITERATIONS_TABLES = {"routing_iterations": COLUMNS}
HEADLINE = [Headline(f"{k} routing iter. %", f"routing_iters_{k}_accuracy", "routing_iterations", {"iters": k},
                     about="Routing iterations: test accuracy of the model retrained with 1 and with 3 routing "
                           "iterations (every count in tables/routing_iterations.csv).") for k in (1, 3)]  # fmt: skip
# Per preset: smoke checks the plumbing (a few steps, a few hundred test images); the others train
# every variant for the run's own length (steps = 0) and test on more images.
SIZING = {
    "smoke": {"steps": 4, "batch_size": 8, "test_n": 256},
    "quick": {"test_n": 2000},
    "standard": {"test_n": 0},
    "full": {"test_n": 0},
}


@dataclass(frozen=True)
class RoutingIterationsConfig:
    model: str = "capsnet-em"  # a model whose routing iterates (routing_iters): CapsNet with the EM head
    iters: list[int] = opt(factory=lambda: [1, 2, 3, 5], ge=1, nonempty=True)  # one variant per count
    steps: int = opt(0, ge=0)  # training steps of each variant (0: the run's train.steps)
    batch_size: int = opt(0, ge=0)  # training batch of each variant (0: the run's train.batch_size)
    test_n: int = opt(0, ge=0)  # test images, one fixed sample for every variant (0: all)
    batch_size_eval: int = opt(250, ge=1)

    def validate(self, where: str = "routing-iterations") -> None:
        if len(set(self.iters)) != len(self.iters):
            raise CapsbenchError(f"{where}.iters must be distinct iteration counts, got {self.iters}")


def no_iterations(name: str) -> str:
    """Why ``name`` has no routing iterations to vary ('' when it has): no routing_iters option,
    or a CapsNet whose routing head ignores it (uniform, self, attention, pooling)."""
    if OPTION not in {f.name for f in dataclasses.fields(MODELS.get(name)[0])}:
        return f"it has no {OPTION} option"
    head = getattr(model_config(name), "routing", None)
    return f"its routing head {head} does not iterate" if head in HEADS and not HEADS.get(head).iterates else ""


def check_model(name: str) -> str:
    """The registered name of ``name``; one line refusing a model without routing iterations."""
    name = model_name(name)
    why = no_iterations(name)
    if why:
        having = [m for m in MODELS.names() if not no_iterations(m)]
        raise CapsbenchError(f"routing-iterations.model: {name} cannot be ablated ({why}); models with routing "
                             f"iterations: {', '.join(having)}")  # fmt: skip
    return name


def check_config(cfg: RoutingIterationsConfig, models: dict[str, Any]) -> None:
    """Run while the suite resolves: the model has routing iterations to vary."""
    check_model(cfg.model)


# ---- the variants ----------------------------------------------------------------------------


def variant_training(ctx: RunContext, cfg: RoutingIterationsConfig) -> TrainConfig:
    """The run's training config, with the part's own steps and batch where it sets them (the
    warmup scaled with the steps, so a short run keeps its shape)."""
    train, over = ctx.train_cfg, {}
    if cfg.steps:
        over = {"steps": cfg.steps, "warmup_steps": min(train.warmup_steps * cfg.steps // train.steps, cfg.steps - 1)}
    if cfg.batch_size:
        over["batch_size"] = cfg.batch_size
    return from_dict(TrainConfig, over, where="routing-iterations", base=train)


def variant_options(ctx: RunContext, name: str, iters: int) -> dict[str, Any]:
    """The model's options for ``iters`` routing iterations: the run's own for it where the run has
    the model (its [model.<name>] table), else its defaults, on the run's data."""
    tm = ctx.models.get(name)
    own = dict((getattr(tm, "meta", None) or {}).get("options") or {})
    return model_options(name, **{**data_options(name, ctx.train_cfg), **own, OPTION: iters})


def iterations_jobs(ctx: RunContext, cfg: RoutingIterationsConfig) -> list[tuple[str, TrainConfig, dict[str, Any]]]:
    """Every variant this part trains, as jobs for an executor to train first."""
    name, train = check_model(cfg.model), variant_training(ctx, cfg)
    return [(name, train, variant_options(ctx, name, k)) for k in cfg.iters]


# ---- the measurement -------------------------------------------------------------------------


def result_row(tm: TrainedModel, iters: int, correct: int, n: int, train: TrainConfig, seed: int) -> dict[str, Any]:
    errors = n - correct
    lo, hi = wilson_interval(errors, n)
    return {"model": tm.name, "dataset": train.dataset, "iters": iters, "seed": seed, "n": n, "errors": errors,
            "error": errors / n, "error_pct": 100 * errors / n, "error_low_pct": 100 * lo, "error_high_pct": 100 * hi,
            "accuracy": correct / n, "steps": tm.meta["steps"], "batch_size": train.batch_size,
            "params": tm.meta["params"], "train_seconds": tm.meta["train_seconds"], "from_cache": tm.cached,
            "train_failed": bool(correct / n < CHANCE_FACTOR / tm.model.num_classes)}  # fmt: skip


@part("routing-iterations", RoutingIterationsConfig, ITERATIONS_TABLES, needs_training=False, precheck=check_config,
      jobs=iterations_jobs, sizing=SIZING, headline=HEADLINE, datasets=None)  # fmt: skip
def run_routing_iterations(ctx: RunContext, cfg: RoutingIterationsConfig) -> PartResult:
    if ctx.data is None:
        raise CapsbenchError("the routing-iterations part trains its own models and needs the run's training set "
                             "(RunContext.data); run it through `python -m capsbench run`")  # fmt: skip
    name, train = check_model(cfg.model), variant_training(ctx, cfg)
    x, y = sample_images(ctx.data.test_x, ctx.data.test_y, cfg.test_n)
    x, y = x.to(ctx.device), y.to(ctx.device)
    rows = []
    for k in cfg.iters:
        tm = ctx.get_trained(name, train, variant_options(ctx, name, k))
        correct = int(count_correct(tm.model, x, y, cfg.batch_size_eval, ctx.dtype, lambda b: test_inputs(train, b)))
        rows.append(result_row(tm, k, correct, len(y), train, ctx.seed))
        how = "cached" if tm.cached else f"trained in {tm.meta['train_seconds']:.0f}s"
        print(f"  routing-iterations {name} {OPTION}={k}: {how}, test error {rows[-1]['error_pct']:.2f}% "
              f"(n={len(y)})", file=sys.stderr)  # fmt: skip
    df = pd.DataFrame(rows, columns=COLUMNS)
    text = summary(df, train, cfg, len(ctx.data.test_y))
    return PartResult({"routing_iterations": df}, {"routing_iterations": error_figure(df)}, text)


# ---- the claim's difference, figure and summary ------------------------------------------------


def one_vs_best(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (model, seed) with 1, 2 and 3 iterations: error(1) - min(error(2), error(3)) in points
    with its Newcombe 95% interval (the claim's measure for one seed)."""
    out = []
    for (model, seed), g in df.groupby(["model", "seed"], sort=False):
        by = g.set_index("iters")
        if not {1, 2, 3} <= set(by.index):
            continue
        best = min((2, 3), key=lambda k: by.error[k])
        one, other = by.loc[1], by.loc[best]
        lo, hi = newcombe_interval(one.errors, int(one.n), other.errors, int(other.n))
        out.append({"model": model, "seed": seed, "best": best, "diff": 100 * (one.error - other.error),
                    "lo": 100 * lo, "hi": 100 * hi})  # fmt: skip
    return out


def error_figure(df: pd.DataFrame) -> Figure:
    """Test error (%) against the number of routing iterations, with 95% Wilson intervals; the
    paper's smallNORB values beside them on a smallNORB run."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    groups = list(df.groupby(["model", "seed"], sort=False))
    colors = sns.color_palette("colorblind", max(len(groups), 1))
    for color, ((model, seed), g) in zip(colors, groups):
        g = g.sort_values("iters")
        yerr = [g.error_pct - g.error_low_pct, g.error_high_pct - g.error_pct]
        ax.errorbar(g.iters, g.error_pct, yerr=yerr, marker="o", capsize=4, color=color, label=f"{model}, seed {seed}")
    if (df.dataset == "smallnorb").any():
        ks = sorted(PAPER_ERROR_PCT)
        ax.plot(ks, [PAPER_ERROR_PCT[k] for k in ks], "k--", marker="s", alpha=0.6, label="Hinton et al. 2018")
    ax.set_xticks(sorted(set(df.iters) | (set(PAPER_ERROR_PCT) if (df.dataset == "smallnorb").any() else set())))
    data = ", ".join(dict.fromkeys(df.dataset))
    title = f"Routing iterations on {data}: 95% Wilson intervals"
    ax.set(xlabel="routing iterations", ylabel="test error (%)", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def protocol_note(train: TrainConfig, cfg: RoutingIterationsConfig, n: int, total: int) -> str:
    return (
        f"{cfg.model} retrained once per routing-iteration count on {train.dataset} under the run's protocol "
        f"({train.steps} steps of {train.batch_size}, {train.schedule_text()}, augment={train.augment}, "
        f"{train.input_size}x{train.input_size} inputs, seed {train.seed}), then tested on {n} test images "
        f"({'all' if n == total else 'a fixed sample'}, the same for every variant): "
        "error [95% Wilson interval]. Hinton et al. 2018 (matrix capsules, smallNORB, 48x48 downsampled with 32x32 "
        "crops): 9.7 / 2.2 / 1.8 / 3.9% for 1 / 2 / 3 / 5 EM iterations."
    )


def summary(df: pd.DataFrame, train: TrainConfig, cfg: RoutingIterationsConfig, total: int) -> str:
    out = ["## Routing iterations (the EM ablation)", "", protocol_note(train, cfg, int(df.n.iloc[0]), total), ""]
    cells = [interval_cell(*b, digits=2) for b in zip(df.error, df.error_low_pct / 100, df.error_high_pct / 100)]
    paper = [f"{PAPER_ERROR_PCT[k]:g}%" if k in PAPER_ERROR_PCT else "–" for k in df.iters]
    shown = df.assign(**{"test error": cells, "paper (smallNORB)": paper})
    out += [markdown_table(shown[["model", "seed", "iters", "test error", "paper (smallNORB)", "n", "steps",
                                  "train_failed", "from_cache"]]), ""]  # fmt: skip
    for d in one_vs_best(df):
        out.append(f"- {d['model']} (seed {d['seed']}): error(1) - error({d['best']}, the better of 2 and 3) = "
                   f"{d['diff']:+.2f} points [Newcombe 95%: {d['lo']:+.2f}, {d['hi']:+.2f}]")  # fmt: skip
    if train.dataset != "smallnorb":
        out.append(f"- The paper's numbers are smallNORB's: on {train.dataset} the claim routing-iterations is not "
                   "judged (its dataset precondition).")  # fmt: skip
    failed = df[df.train_failed]
    if len(failed):
        out.append(f"- Training failed (test accuracy below {CHANCE_FACTOR:g}x chance) for {OPTION} = "
                   f"{', '.join(map(str, failed.iters))}: those errors say nothing about routing.")  # fmt: skip
    return "\n".join(out) + "\n"
