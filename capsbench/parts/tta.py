"""The `tta` part: wall-clock time for a model trained from scratch to first reach a target MNIST
test accuracy (e.g. CapsNet to 99.6%), with the schedule that got there.

Timed: from the first training step to the end of the first evaluation at or above the target,
every training step and every evaluation included (the test set is evaluated every
``eval_every`` steps; those evaluations are the only host syncs). Not timed: loading MNIST and
moving it to the device, building the model, and the warm-up, reported apart as ``compile_s``:
``prewarm_steps`` training steps and one evaluation of the same model (torch.compile, cuDNN
autotuning, allocator), whose weights, optimizer and random state are then reset, paid once
for all repeats. A run stops at the target or at its budget (``max_steps``, or ``max_seconds``
checked at evaluations); one that stopped short of the target is reported with reached = False.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from torch import Tensor

from capsbench.core.config import PRECISION_ALIASES, Precision, opt
from capsbench.core.device import describe, dtype_label
from capsbench.core.errors import CapsbenchError
from capsbench.core.timing import synchronize
from capsbench.models import BenchModel, build_model, model_options
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.report.format import checks_footer, markdown_table
from capsbench.train.config import TrainConfig
from capsbench.train.schedules import Schedule, describe_schedule
from capsbench.train.step import CompileMode
from capsbench.train.tasks import Evaluation, MnistTask
from capsbench.train.trainer import Trainer

TICKS = (0.1, 0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)  # accuracy ticks of the logit axis


@dataclass(frozen=True)
class TimeToAccuracyConfig:
    """Keys of the ``[tta]`` table of a suite file."""

    model: str = "capsnet"  # a registered model; options from the suite's [model.NAME], at 28x28
    target: float = opt(0.996, gt=0, le=1)  # test accuracy to reach
    batch_size: int = opt(512, ge=1)
    lr: float = opt(2e-3, gt=0)  # peak learning rate (Adam)
    schedule: Literal["onecycle", "paper"] = "onecycle"  # onecycle: warmup, cosine to 0 at max_steps; paper: x0.96 per 2000
    warmup_steps: int = opt(100, ge=0)  # linear lr warmup (either schedule; 0 = none)
    max_steps: int = opt(1500, ge=1)  # the budget, and the length of the onecycle schedule
    max_seconds: float = opt(0.0, ge=0)  # a wall-clock budget checked at evaluations (0 = none)
    eval_every: int = opt(100, ge=1)  # steps between test evaluations (the only host syncs)
    eval_batch_size: int = opt(1000, ge=1)
    test_n: int = opt(0, ge=0)  # test images per evaluation (0 = all 10,000)
    train_n: int = opt(0, ge=0)  # training images (0 = all 60,000)
    augment: Literal["shift", "none"] = "shift"  # shift: the paper's random shifts of up to max_shift px (28x28)
    max_shift: int = opt(2, ge=0)
    amp: Precision = opt("auto", aliases=PRECISION_ALIASES)  # auto: bf16 on CUDA; CPU: bf16 training where native, fp32 (core/device.py)
    compile: bool = False  # torch.compile forward + loss (falls back to eager with a notice)
    compile_mode: CompileMode = "default"  # inductor mode (reduce-overhead / max-autotune: CUDA graphs on a GPU)
    channels_last: bool = False  # NHWC convolutions
    prewarm_steps: int = opt(3, ge=0)  # untimed warm-up steps before the first repeat (0 = none)
    repeats: int = opt(1, ge=1)  # runs with seeds seed, seed + 1, ...; the summary reports the median

    def validate(self, where: str) -> None:
        from capsbench.models import MODELS

        if self.model not in MODELS:
            known = ", ".join(MODELS.names())
            raise CapsbenchError(f"{where}.model: unknown model {self.model!r}; known models: {known}")
        if self.warmup_steps >= self.max_steps:
            raise CapsbenchError(f"{where}.warmup_steps must be < max_steps ({self.max_steps}), got {self.warmup_steps}")

    def train_config(self, seed: int) -> TrainConfig:
        """The MNIST task's view of this config (``TimedTask`` replaces its evaluations)."""
        return TrainConfig(steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, seed=seed,
                           schedule=self.schedule, warmup_steps=self.warmup_steps,
                           augment=self.augment, max_shift=self.max_shift, train_subset=self.train_n,
                           test_subset=self.test_n, amp=self.amp, compile=self.compile, compile_mode=self.compile_mode,
                           channels_last=self.channels_last, description="tta")  # fmt: skip


# ---- schedule ------------------------------------------------------------------------------


def lr_schedule(cfg: TimeToAccuracyConfig) -> Schedule:
    """The registered ``cfg.schedule`` after a linear warmup of ``warmup_steps``; onecycle reaches
    0 at ``max_steps``, paper decays x0.96 every 2000 steps from the warmup's end."""
    return cfg.train_config(seed=0).lr_schedule()  # the seed does not enter the schedule


def schedule_text(cfg: TimeToAccuracyConfig) -> str:
    return describe_schedule(lr_schedule(cfg), cfg.lr)


# ---- one run -------------------------------------------------------------------------------


class TimedTask(MnistTask):
    """The MNIST task under tta's rules, for the one Trainer: each epoch's order drawn on the
    device from one generator (a host randperm + copy would sync), the loss read only at the
    evaluations, one every ``eval_every`` steps and after the last, clocked from ``start``; a run
    stops at its first evaluation at or above the target, or past ``max_seconds``. No checkpoints:
    a repeat is a timing measurement and runs from scratch."""

    def __init__(self, cfg: TimeToAccuracyConfig, data: Any, device: torch.device, seed: int) -> None:
        super().__init__(cfg.train_config(seed), data, device)
        self.tta = cfg  # the schedule is the MNIST task's, from cfg.train_config
        self.log_every = self.checkpoint_every = cfg.eval_every  # the evaluations are the only syncs
        self.lr_key, self.amp_key = "tta.lr", "tta.amp"
        self.order_gen = torch.Generator(device=device)
        self.t0, self.eval_s, self.rows = 0.0, 0.0, []
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Augmentation and order generators from ``seed``; the first epoch's order is drawn anew."""
        self.gen.manual_seed(seed)
        self.order_gen.manual_seed(seed)
        self.order_epoch = -1

    def epoch_order(self, epoch: int) -> Tensor:
        return torch.randperm(len(self.train_x), device=self.device, generator=self.order_gen)

    def start(self) -> None:
        synchronize(self.device)
        self.t0, self.eval_s, self.rows = time.perf_counter(), 0.0, []

    def eval_due(self, step: int) -> bool:
        return step % self.tta.eval_every == 0 or step == self.steps

    def evaluate(self, model: BenchModel, step: int, log: dict[str, Any]) -> Evaluation:
        """One row: the test accuracy, ``wall_s`` since the first step and the evaluations' share."""
        cfg = self.tta
        synchronize(self.device)  # the queued steps are training time, not evaluation time
        t_eval = time.perf_counter()
        acc, m = self.test_accuracy(model, cfg.eval_batch_size)
        now = time.perf_counter()
        self.eval_s += now - t_eval
        self.rows.append({"step": step, "epoch": step / self.steps_per_epoch, "images_seen": step * cfg.batch_size,
                          "wall_s": now - self.t0, "eval_s": self.eval_s, "test_accuracy": acc, "test_n": m,
                          "lr": cfg.lr * self.schedule.factor(step - 1), "train_loss": log["train_loss"]})  # fmt: skip
        stop = acc >= cfg.target or bool(cfg.max_seconds and now - self.t0 >= cfg.max_seconds)
        return Evaluation(self.rows[-1], stop)

    def final(self, model: BenchModel, step: int) -> None:
        return None  # the last step was evaluated


def reset(tr: Trainer, task: TimedTask, cfg: TimeToAccuracyConfig, options: dict[str, Any], seed: int) -> None:
    """Fresh initial weights, optimizer, schedule and random state, all from ``seed``."""
    torch.manual_seed(seed)  # initial weights (and dropout, for models that have it)
    tr.model.load_state_dict(build_model(cfg.model, **options).state_dict())
    tr.model.train()
    tr.restart()
    task.reseed(seed)


def warm_up(tr: Trainer, task: TimedTask, cfg: TimeToAccuracyConfig) -> float:
    """Seconds of ``prewarm_steps`` training steps and one evaluation (compile, autotuning,
    allocator); untimed in the results, and the caller resets the model afterwards."""
    if cfg.prewarm_steps == 0:
        return 0.0
    synchronize(tr.device)
    t0 = time.perf_counter()
    idx = torch.arange(cfg.batch_size, device=tr.device)
    for _ in range(cfg.prewarm_steps):
        tr.train_step(task.examples(idx))
    task.test_accuracy(tr.model, cfg.eval_batch_size)
    synchronize(tr.device)
    return time.perf_counter() - t0


def timed_run(tr: Trainer, task: TimedTask, seed: int) -> list[dict[str, Any]]:
    """Train from the reset state until the first evaluation at or above the target, or the
    budget; one row per evaluation, ``wall_s`` counted from before the first step."""
    tr.label = f"tta {task.tta.model} seed {seed}"
    tr.run()
    return task.rows


def result_row(rows: list[dict[str, Any]], cfg: TimeToAccuracyConfig, info: dict[str, Any], seed: int,
               repeat: int) -> dict[str, Any]:  # fmt: skip
    """One repeat's outcome from its evaluation rows."""
    last = rows[-1]
    reached = last["test_accuracy"] >= cfg.target
    train_s = last["wall_s"] - last["eval_s"]
    return {
        "model": cfg.model, "repeat": repeat, "seed": seed, "device": info["device"], "dtype": info["dtype"],
        "compile": info["compiled"], "batch_size": cfg.batch_size, "schedule": cfg.schedule, "lr": cfg.lr,
        "warmup_steps": cfg.warmup_steps, "max_steps": cfg.max_steps, "augment": cfg.augment,
        "max_shift": cfg.max_shift if cfg.augment == "shift" else 0, "target": cfg.target, "reached": reached,
        "steps": last["step"], "images_seen": last["images_seen"],
        "wall_s_to_target": last["wall_s"] if reached else math.nan, "wall_s": last["wall_s"],
        "eval_s": last["eval_s"], "best_accuracy": max(r["test_accuracy"] for r in rows),
        "final_accuracy": last["test_accuracy"], "test_n": last["test_n"], "train_n": info["train_n"],
        "compile_s": info["compile_s"],
        "train_images_per_s": last["images_seen"] / train_s if train_s > 0 else math.nan,
    }  # fmt: skip


# ---- the part ------------------------------------------------------------------------------


def make_trainer(ctx: RunContext, cfg: TimeToAccuracyConfig) -> tuple[Trainer, TimedTask, dict[str, Any]]:
    """The Trainer and its task (data moved to the device once, for every repeat) and the model options."""
    tm = ctx.models.get(cfg.model)
    options = model_options(cfg.model, **{**((tm.meta.get("options") or {}) if tm else {}), "input_size": 28})
    task = TimedTask(cfg, ctx.data, ctx.device, ctx.seed)
    if cfg.batch_size > len(task.train_x):
        raise CapsbenchError(f"tta.batch_size {cfg.batch_size} exceeds the {len(task.train_x)} training images")
    torch.manual_seed(ctx.seed)
    tr = Trainer(build_model(cfg.model, **options), task, progress=ctx.progress, label=f"tta {cfg.model}")
    return tr, task, options


TTA_TABLES = {
    "tta": ("model", "repeat", "seed", "device", "dtype", "compile", "batch_size", "schedule", "lr", "warmup_steps",
            "max_steps", "augment", "max_shift", "target", "reached", "steps", "images_seen", "wall_s_to_target",
            "wall_s", "eval_s", "best_accuracy", "final_accuracy", "test_n", "train_n", "compile_s",
            "train_images_per_s"),
    "tta_curve": ("repeat", "seed", "step", "epoch", "images_seen", "wall_s", "eval_s", "test_accuracy", "test_n",
                  "lr", "train_loss"),
}


@part("tta", TimeToAccuracyConfig, TTA_TABLES, needs_training=False)
def run_tta(ctx: RunContext, cfg: TimeToAccuracyConfig) -> PartResult:
    """Train ``cfg.repeats`` fresh models to the target; time each from its first step."""
    if ctx.data is None:
        raise CapsbenchError("the tta part needs the MNIST training set; run it through `python -m capsbench run`")
    tr, task, options = make_trainer(ctx, cfg)
    info = {"device": describe(ctx.device), "dtype": dtype_label(task.dtype),
            "compile_s": warm_up(tr, task, cfg), "train_n": len(task.train_x)}  # fmt: skip
    curve, results = [], []
    for i in range(cfg.repeats):
        seed = ctx.seed + i
        reset(tr, task, cfg, options, seed)
        rows = timed_run(tr, task, seed)
        # after the run: a compile that failed on its first call fell back to eager
        info["compiled"] = tr.step_fn.compiled
        curve += [{"repeat": i, "seed": seed, **r} for r in rows]
        results.append(result_row(rows, cfg, info, seed, i))
        print(f"  tta {outcome(results[-1])}", file=sys.stderr)
    curve_df = pd.DataFrame(curve, columns=TTA_TABLES["tta_curve"])
    df = pd.DataFrame(results, columns=TTA_TABLES["tta"])
    checks = sanity_checks(curve_df, df, cfg)
    figures = {"tta_curve": curve_figure(curve_df, cfg, info["device"])}
    return PartResult({"tta": df, "tta_curve": curve_df}, figures, summary(df, cfg, info, options, checks), checks)


def outcome(r: dict[str, Any]) -> str:
    head = f"{r['model']} seed {r['seed']}:"
    if r["reached"]:
        return f"{head} {100 * r['final_accuracy']:.2f}% at step {r['steps']} in {r['wall_s_to_target']:.1f} s"
    return (f"{head} target {100 * r['target']:.2f}% not reached in {r['steps']} steps, {r['wall_s']:.1f} s "
            f"(best {100 * r['best_accuracy']:.2f}%)")  # fmt: skip


def median_time(times: list[float]) -> float:
    """Median seconds to target over repeats, a repeat that missed (NaN) counting as infinitely
    slow: the median is finite only when more than half reached the target."""
    return statistics.median([t if math.isfinite(t) else math.inf for t in times]) if times else math.nan


# ---- checks, figure, summary ---------------------------------------------------------------


def sanity_checks(curve: pd.DataFrame, df: pd.DataFrame, cfg: TimeToAccuracyConfig) -> list[Check]:
    acc = curve.test_accuracy
    finite = bool(acc.between(0, 1).all())  # NaN fails between()
    runs = [g for _, g in curve.groupby("repeat")]
    rising = all(g.wall_s.is_monotonic_increasing and g.wall_s.is_unique for g in runs)
    early = [int(g.seed.iloc[0]) for g in runs if (g.test_accuracy.iloc[:-1] >= cfg.target).any()]
    checks = [
        Check("tta: every test accuracy is finite and in [0, 1]", finite,
              f"{len(acc)} evaluations, min {acc.min():.4f}, max {acc.max():.4f}"),
        Check("tta: wall time grows at every evaluation", rising, f"{len(df)} repeat(s)"),
        Check("tta: each run stopped at its first evaluation at or above the target", not early,
              f"target {cfg.target}; seeds that went on past it: {early or 'none'}"),
    ]  # fmt: skip
    if cfg.compile:
        ok = bool(df["compile"].all())
        detail = "compiled" if ok else "compile failed; the runs are eager (see the notice above)"
        checks.append(Check("tta: torch.compile was used as configured", ok, detail))
    return checks


def curve_figure(curve: pd.DataFrame, cfg: TimeToAccuracyConfig, device: str) -> Figure:
    """Test accuracy against wall seconds since the first step, one line per repeat, on a logit
    axis (so both the early 10%..90% and the last 0.1% near the target stay readable)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    n = int(curve.test_n.max()) if len(curve) else 1
    clip = lambda a: a.clip(0.5 / n, 1 - 0.5 / n)  # noqa: E731 - 0% and 100% are infinite on a logit axis
    groups = list(curve.groupby(["repeat", "seed"]))
    for ((rep, seed), g), color in zip(groups, sns.color_palette("colorblind", len(groups))):
        ax.plot(g.wall_s, clip(g.test_accuracy), marker="o", ms=3, color=color, label=f"repeat {rep} (seed {seed})")
    ax.axhline(min(cfg.target, 1 - 0.5 / n), color="k", ls="--", lw=1, label=f"target {100 * cfg.target:.2f}%")
    ax.set_yscale("logit")
    ax.yaxis.set_major_locator(FixedLocator(TICKS))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="wall seconds since the first training step (evaluations included)",
           ylabel=f"test accuracy (logit scale), n={n}",
           title=f"{cfg.model} time to {100 * cfg.target:.2f}% on {device}\nbatch {cfg.batch_size}, {cfg.schedule}, "
           f"peak lr {cfg.lr:g}")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def summary(df: pd.DataFrame, cfg: TimeToAccuracyConfig, info: dict[str, Any], options: dict[str, Any],
            checks: list[Check]) -> str:  # fmt: skip
    reached = df[df.reached]
    med = median_time(list(df.wall_s_to_target))
    n_train, n_test = info["train_n"], int(df.test_n.iloc[0])
    headline = (f"**Median time to {100 * cfg.target:.2f}%: {med:.1f} s** over {len(df)} repeat(s), "
                f"{len(reached)} of {len(df)} reached it" if math.isfinite(med) else
                f"**Target {100 * cfg.target:.2f}% not reached by the median run**: {len(reached)} of {len(df)} "
                f"repeat(s) reached it within the budget")  # fmt: skip
    if len(reached):
        headline += f" (fastest {reached.wall_s_to_target.min():.1f} s, slowest {reached.wall_s_to_target.max():.1f} s)"
    aug = f"random shifts of up to {cfg.max_shift} px" if cfg.augment == "shift" and cfg.max_shift else "none"
    budget = f"{cfg.max_steps} steps" + (f" or {cfg.max_seconds:g} s" if cfg.max_seconds else "")
    non_default = {k: v for k, v in options.items() if v != model_options(cfg.model, input_size=28)[k]}
    lines = [
        "## Time to accuracy", "",
        f"{headline}; device: {info['device']}.", "",
        f"- schedule: batch {cfg.batch_size}, {schedule_text(cfg)}; budget {budget}; augmentation: {aug}; "
        f"dtype {info['dtype']}; torch.compile {'on' if info['compiled'] else 'off'}",
        f"- model: `{cfg.model}`{f' with {non_default}' if non_default else ''}; {n_train:,} training images; "
        f"test accuracy on {n_test:,} MNIST test images every {cfg.eval_every} steps",
        "- timed (`wall_s_to_target`): from the first training step to the end of the first evaluation at or "
        "above the target, every training step and every evaluation included; the data was already on the "
        "device. Not timed: loading data, building the model, and the warm-up "
        f"(`compile_s` = {info['compile_s']:.1f} s: {cfg.prewarm_steps} training step(s) and one evaluation of the "
        "same model, whose weights, optimizer and random state were then reset; paid once for all repeats).",
        "",
        markdown_table(df[["seed", "reached", "steps", "images_seen", "wall_s_to_target", "wall_s", "eval_s",
                           "best_accuracy", "final_accuracy", "train_images_per_s", "compile_s"]]),
        "",
    ]  # fmt: skip
    lines += checks_footer(checks)
    return "\n".join(lines) + "\n"
