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
from typing import Any

import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from tqdm.auto import tqdm

from capsbench.core.device import describe
from capsbench.core.errors import CapsbenchError
from capsbench.models import BenchModel, build_model, model_options
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.report.format import markdown_table
from capsbench.core.timing import synchronize
from capsbench.train.config import TrainConfig
from capsbench.train.trainer import Trainer, evaluate, test_inputs
from capsbench.train.step import check_compile_mode

SCHEDULES = ("onecycle", "paper")
PAPER = TrainConfig()  # the paper's decay: x0.96 every 2000 steps, continuously
TICKS = (0.1, 0.5, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)  # accuracy ticks of the logit axis


@dataclass(frozen=True)
class TimeToAccuracyConfig:
    """Keys of the ``[tta]`` table of a suite file."""

    model: str = "capsnet"  # a registered model; options from the suite's [model.NAME], at 28x28
    target: float = 0.996  # test accuracy to reach
    batch_size: int = 512
    lr: float = 2e-3  # peak learning rate (Adam)
    schedule: str = "onecycle"  # onecycle: linear warmup, cosine to 0 at max_steps; paper: x0.96 per 2000 steps
    warmup_steps: int = 100  # linear lr warmup (either schedule; 0 = none)
    max_steps: int = 1500  # the budget, and the length of the onecycle schedule
    max_seconds: float = 0.0  # a wall-clock budget checked at evaluations (0 = none)
    eval_every: int = 100  # steps between test evaluations (the only host syncs)
    eval_batch_size: int = 1000
    test_n: int = 0  # test images per evaluation (0 = all 10,000)
    train_n: int = 0  # training images (0 = all 60,000)
    augment: str = "shift"  # shift: the paper's random shifts of up to max_shift px; none
    max_shift: int = 2
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU), bf16, off
    compile: bool = False  # torch.compile forward + loss (falls back to eager with a notice)
    compile_mode: str = "default"  # inductor mode (reduce-overhead / max-autotune: CUDA graphs on a GPU)
    channels_last: bool = False  # NHWC convolutions
    prewarm_steps: int = 3  # untimed warm-up steps before the first repeat (0 = none)
    repeats: int = 1  # runs with seeds seed, seed + 1, ...; the summary reports the median

    def validate(self, where: str) -> None:
        from capsbench.models import MODELS

        if self.model not in MODELS:
            known = ", ".join(MODELS.names())
            raise CapsbenchError(f"{where}.model: unknown model {self.model!r}; known models: {known}")
        if not 0 < self.target <= 1:
            raise CapsbenchError(f"{where}.target must be a test accuracy in (0, 1], got {self.target}")
        for key in ("batch_size", "max_steps", "eval_every", "eval_batch_size", "repeats"):
            if getattr(self, key) < 1:
                raise CapsbenchError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "max_seconds", "test_n", "train_n", "max_shift", "prewarm_steps"):
            if getattr(self, key) < 0:
                raise CapsbenchError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if self.warmup_steps >= self.max_steps:
            raise CapsbenchError(f"{where}.warmup_steps must be < max_steps ({self.max_steps}), got {self.warmup_steps}")
        if not self.lr > 0:
            raise CapsbenchError(f"{where}.lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise CapsbenchError(f"{where}.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.augment not in ("shift", "none"):
            raise CapsbenchError(f"{where}.augment must be shift or none (28x28 MNIST), got {self.augment!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise CapsbenchError(f"{where}.amp must be auto, bf16 or off, got {self.amp!r}")
        check_compile_mode(self.compile_mode, f"{where}.compile_mode")

    def train_config(self, seed: int) -> TrainConfig:
        """The Trainer's view of this config (its own lr schedule is replaced by ``lr_factor``)."""
        return TrainConfig(steps=self.max_steps, batch_size=self.batch_size, lr=self.lr, seed=seed,
                           augment=self.augment, max_shift=self.max_shift, train_subset=self.train_n,
                           test_subset=self.test_n, amp=self.amp, compile=self.compile, compile_mode=self.compile_mode,
                           channels_last=self.channels_last, description="tta")  # fmt: skip


# ---- schedule ------------------------------------------------------------------------------


def lr_factor(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index ``step``: linear warmup
    to 1 over ``warmup_steps``, then cosine to 0 at ``max_steps`` (onecycle) or the paper's decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "paper":
        return PAPER.lr_decay ** ((step - warmup_steps) / PAPER.lr_decay_steps)
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: BenchModel, cfg: TimeToAccuracyConfig, device: torch.device):
    """Adam at the peak lr (fused on CUDA) with ``lr_factor`` as a LambdaLR schedule."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.schedule, cfg.warmup_steps, cfg.max_steps))
    return opt, sched


def schedule_text(cfg: TimeToAccuracyConfig) -> str:
    steps = f"{cfg.warmup_steps} step{'s' if cfg.warmup_steps != 1 else ''}"
    warm = f"linear warmup over {steps}, then " if cfg.warmup_steps else ""
    decay = (f"cosine decay to 0 at step {cfg.max_steps}" if cfg.schedule == "onecycle"
             else f"x{PAPER.lr_decay} every {PAPER.lr_decay_steps} steps (the paper's, continuous)")  # fmt: skip
    return f"Adam, peak lr {cfg.lr:g}, {warm}{decay}"


# ---- one run -------------------------------------------------------------------------------


def reset(tr: Trainer, cfg: TimeToAccuracyConfig, options: dict[str, Any], seed: int) -> None:
    """Fresh initial weights, optimizer, schedule and augmentation RNG, all from ``seed``."""
    torch.manual_seed(seed)  # initial weights (and dropout, for models that have it)
    tr.model.load_state_dict(build_model(cfg.model, **options).state_dict())
    tr.model.train()
    tr.set_optimizer(*make_optimizer(tr.model, cfg, tr.device))
    tr.gen.manual_seed(seed)


def eval_accuracy(tr: Trainer, cfg: TimeToAccuracyConfig) -> tuple[float, int]:
    return evaluate(tr.model, tr.test_x, tr.test_y, lambda xb: test_inputs(tr.cfg, xb), cfg.eval_batch_size, tr.dtype)


def warm_up(tr: Trainer, cfg: TimeToAccuracyConfig) -> float:
    """Seconds of ``prewarm_steps`` training steps and one evaluation (compile, autotuning,
    allocator); untimed in the results, and the caller resets the model afterwards."""
    if cfg.prewarm_steps == 0:
        return 0.0
    synchronize(tr.device)
    t0 = time.perf_counter()
    idx = torch.arange(cfg.batch_size, device=tr.device)
    for _ in range(cfg.prewarm_steps):
        tr.train_step(idx)
    eval_accuracy(tr, cfg)
    synchronize(tr.device)
    return time.perf_counter() - t0


def timed_run(tr: Trainer, cfg: TimeToAccuracyConfig, seed: int, label: str, progress: bool) -> list[dict[str, Any]]:
    """Train from the reset state until the first evaluation at or above the target, or the
    budget; one row per evaluation, ``wall_s`` counted from before the first step."""
    device, bs, n = tr.device, cfg.batch_size, len(tr.train_x)
    order_gen = torch.Generator(device=device).manual_seed(seed)
    loss_sum, since, eval_s, rows = torch.zeros((), device=device), 0, 0.0, []
    bar = tqdm(total=cfg.max_steps, desc=label, unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=1.0, file=sys.stderr)  # fmt: skip
    synchronize(device)
    t0 = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        pos = (step - 1) % tr.steps_per_epoch
        if pos == 0:  # a new epoch's order, drawn on the device (a host randperm + copy would sync)
            order = torch.randperm(n, device=device, generator=order_gen)
        loss, _ = tr.train_step(order[pos * bs : (pos + 1) * bs])
        loss_sum += loss
        since += 1
        if step % cfg.eval_every and step < cfg.max_steps:
            continue
        synchronize(device)  # the queued steps are training time, not evaluation time
        t_eval = time.perf_counter()
        acc, m = eval_accuracy(tr, cfg)
        loss_mean = loss_sum.item() / since
        now = time.perf_counter()
        if not math.isfinite(loss_mean):
            raise CapsbenchError(f"{label} diverged: loss is {loss_mean} at step {step}; lower the learning rate "
                                 "(--set tta.lr=...) or turn off bf16 (--set tta.amp=off)")  # fmt: skip
        eval_s += now - t_eval
        rows.append({"step": step, "epoch": step / tr.steps_per_epoch, "images_seen": step * bs,
                     "wall_s": now - t0, "eval_s": eval_s, "test_accuracy": acc, "test_n": m,
                     "lr": cfg.lr * lr_factor(step - 1, cfg.schedule, cfg.warmup_steps, cfg.max_steps),
                     "train_loss": loss_mean})  # fmt: skip
        loss_sum.zero_()
        since = 0
        bar.set_postfix(acc=f"{acc:.4f}", wall=f"{now - t0:.1f}s", refresh=False)
        bar.update(step - bar.n)
        if acc >= cfg.target or (cfg.max_seconds and now - t0 >= cfg.max_seconds):
            break
    bar.close()
    return rows


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


def make_trainer(ctx: RunContext, cfg: TimeToAccuracyConfig) -> tuple[Trainer, dict[str, Any]]:
    """The Trainer (data moved to the device once, for every repeat) and the model options."""
    tm = ctx.models.get(cfg.model)
    options = model_options(cfg.model, **{**((tm.meta.get("options") or {}) if tm else {}), "input_size": 28})
    torch.manual_seed(ctx.seed)
    tr = Trainer(build_model(cfg.model, **options), cfg.train_config(ctx.seed), ctx.data, ctx.device,
                 progress=False, label=f"tta {cfg.model}")  # fmt: skip
    if cfg.batch_size > len(tr.train_x):
        raise CapsbenchError(f"tta.batch_size {cfg.batch_size} exceeds the {len(tr.train_x)} training images")
    return tr, options


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
    tr, options = make_trainer(ctx, cfg)
    info = {"device": describe(ctx.device), "dtype": "bf16" if tr.dtype is torch.bfloat16 else "fp32",
            "compile_s": warm_up(tr, cfg), "train_n": len(tr.train_x)}  # fmt: skip
    curve, results = [], []
    for i in range(cfg.repeats):
        seed = ctx.seed + i
        reset(tr, cfg, options, seed)
        rows = timed_run(tr, cfg, seed, f"tta {cfg.model} seed {seed}", ctx.progress)
        # after the run: a compile that failed on its first call fell back to eager
        info["compiled"] = tr.step_fn.compiled
        curve += [{"repeat": i, "seed": seed, **r} for r in rows]
        results.append(result_row(rows, cfg, info, seed, i))
        print(f"  tta {outcome(results[-1])}", file=sys.stderr)
    curve_df, df = pd.DataFrame(curve), pd.DataFrame(results)
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
    failed = [c for c in checks if not c.passed]
    lines += [f"**Checks**: {len(checks) - len(failed)} of {len(checks)} passed."]
    lines += [f"- FAIL {c.name}: {c.detail}" for c in failed]
    return "\n".join(lines) + "\n"
