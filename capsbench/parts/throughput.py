"""The throughput part: training and inference images/s over batch sizes (median and IQR of the
step time), peak memory, parameters and MACs per image, and CapsNet's cost as the number of
routing iterations grows (Sabour et al. 2017 use 3). Timing follows capsbench.core.timing's recipe;
the published speeds it can be compared with are in shared/capsnet-facts.md."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from tqdm.auto import tqdm

from capsbench.core.allocator import cpu_allocator_tuned
from capsbench.core.config import Precision, opt, weight_fields
from capsbench.core.device import amp_dtype, describe, dtype_label
from capsbench.core.timing import count_macs, peak_memory_mb, reset_peak_memory, summarize, synchronize, time_fn
from capsbench.models import BenchModel, CapsNetConfig, build_model
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.report.format import markdown_table
from capsbench.report.headline import Headline
from capsbench.train.step import CompileMode, InferStep, StepOptions, TrainStep

Mode = Literal["train", "inference"]
PAPER_MACS = 203e6  # CapsNet forward MACs per 28x28 image (shared/capsnet-facts.md)


@dataclass(frozen=True)
class ThroughputConfig:
    """Keys of the ``[throughput]`` table of a suite file."""

    batch_sizes: list[int] = opt(factory=lambda: [1, 32, 128, 512], ge=1, nonempty=True)
    warmup: int = opt(3, ge=0)  # untimed steps before the timed ones (allocator, cuDNN and autotuning warm-up)
    repeats: int = opt(10, ge=1)  # timed steps per setting (5 or more recommended); the median and IQR are reported
    modes: list[Mode] = opt(factory=lambda: ["train", "inference"], nonempty=True)
    routing_iters: list[int] = opt(factory=lambda: [1, 2, 3, 5], ge=1)  # CapsNet cost vs iterations
    routing_batch_size: int = opt(128, ge=1)  # the one batch size of the routing sweep
    dtypes: list[Precision] = opt(factory=lambda: ["auto"], nonempty=True)  # auto: bf16 on CUDA; CPU: bf16 training where native, fp32 (core/device.py)
    compile: list[bool] = opt(factory=lambda: [False], nonempty=True)  # torch.compile forward + loss
    compile_mode: CompileMode = "default"  # inductor mode of the compiled settings (reduce-overhead: CUDA graphs)
    channels_last: list[bool] = opt(factory=lambda: [False], nonempty=True)  # NHWC convolutions
    max_seconds: float = opt(60.0, gt=0)  # per model and sweep: larger batch sizes are skipped once spent


def is_oom(e: BaseException) -> bool:
    """Out of device (or host) memory, as opposed to a bug."""
    text = str(e)
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def make_step(model: BenchModel, mode: str, batch: int, options: StepOptions, seed: int,
              channels: int = 1) -> tuple[Callable[[], None], TrainStep | InferStep]:  # fmt: skip
    """One training step (forward, objective, backward, Adam: the Trainer's TrainStep) or one
    no-grad forward, as a closure over random inputs already on the device, and the step object
    (which says whether it really ran compiled). It runs a copy: the given weights are never touched."""
    device = options.device
    gen = torch.Generator(device=device).manual_seed(seed)
    S = model.input_size
    x = torch.rand(batch, channels, S, S, device=device, generator=gen)  # (B, C, S, S) in [0, 1], resident
    y = torch.randint(0, model.num_classes, (batch,), device=device, generator=gen)  # (B,)
    m = copy.deepcopy(model).train(mode == "train")  # a compiled step compiles afresh: an honest compile_s
    if mode == "inference":
        infer = InferStep(m, options)
        return lambda: infer(x), infer
    step = TrainStep(m, torch.optim.Adam(m.parameters(), lr=1e-3, fused=device.type == "cuda"), options)
    return lambda: step(x, y), step


def timed_steps(fn: Callable[[], None], compiled: bool, cfg: ThroughputConfig,
                device: torch.device) -> tuple[list[float], float]:  # fmt: skip
    """(seconds per timed step, compile seconds or NaN). A compiled step's first call compiles:
    it is timed on its own, before the usual warm-up."""
    compile_s = math.nan
    if compiled:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        compile_s = time.perf_counter() - t0
    return time_fn(fn, cfg.warmup, cfg.repeats, device), compile_s


class CompileFailed(Exception):
    """torch.compile failed for a setting (the step fell back to eager)."""


def measure(model: BenchModel, mode: str, batch: int, options: StepOptions, cfg: ThroughputConfig,
            seed: int, channels: int = 1) -> dict[str, float] | None:  # fmt: skip
    """Median/IQR step time, images/s, peak memory and compile time of one setting; None on OOM."""
    device = options.device
    baseline = reset_peak_memory(device)
    try:
        fn, step = make_step(model, mode, batch, options, seed, channels)
        times, compile_s = timed_steps(fn, options.compile, cfg, device)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        times = None
    if times is None:  # outside the except block, so the failed step's tensors are already freed
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None
    if options.compile and not step.compiled:  # CompileOrEager fell back: these were eager steps
        raise CompileFailed(step.failure)
    s = summarize(times)
    return {"samples_per_sec": batch / s["median"], "step_ms_median": 1e3 * s["median"], "step_ms_iqr": 1e3 * s["iqr"],
            "peak_mem_mb": peak_memory_mb(device, baseline), "compile_s": compile_s}  # fmt: skip


def run_info(ctx: RunContext) -> dict[str, Any]:
    """Device and version metadata repeated on every row."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = torch.version.cuda if ctx.device.type == "cuda" else None
    return {"device": str(ctx.device), "device_name": describe(ctx.device), "cpu_count": cores,
            "torch_version": str(torch.__version__), "cuda_version": cuda}  # fmt: skip


def routing_iters_of(model: BenchModel) -> int | None:
    """The model's routing iterations; None for models without routing."""
    return getattr(getattr(model, "cfg", None), "routing_iters", None)


class Budget:
    """``max_seconds`` for one sweep: skip a setting once the time is spent or its projected cost
    (last seconds per image of the same kind x images still to run) would overrun it."""

    def __init__(self, seconds: float, steps: int) -> None:
        self.seconds, self.steps, self.start = seconds, steps, time.perf_counter()
        self.per_image: dict[Any, float] = {}

    def allows(self, key: Any, batch: int) -> bool:
        projected = self.per_image.get(key, 0.0) * batch * self.steps
        return time.perf_counter() - self.start + projected <= self.seconds

    def record(self, key: Any, batch: int, step_ms: float) -> None:
        self.per_image[key] = step_ms / 1e3 / batch


def sweep_model(name: str, model: BenchModel, ctx: RunContext, cfg: ThroughputConfig,
                info: dict[str, Any], notes: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """All (batch size, dtype, channels_last, compile, mode) settings of one model, smallest
    batches first, so the time budget cuts the largest ones."""
    S = model.input_size
    static = {"params": model.num_params(), "repeats": cfg.repeats, "seed": ctx.seed,
              "macs_per_sample": count_macs(model.nominal(), torch.rand(2, ctx.channels, S, S, device=ctx.device)) // 2,
              "routing_iters": routing_iters_of(model) or math.nan, **info}  # fmt: skip
    settings = list(itertools.product(sorted(set(cfg.batch_sizes)), cfg.dtypes, cfg.channels_last, cfg.compile,
                                      cfg.modes))  # fmt: skip
    budget = Budget(cfg.max_seconds, cfg.warmup + cfg.repeats)
    rows, skipped, oom, compile_failed = [], [], [], False
    for batch, dname, nhwc, compiled, mode in tqdm(settings, desc=f"throughput {name}", disable=not ctx.progress,
                                                   file=sys.stderr, dynamic_ncols=True):  # fmt: skip
        if compiled and compile_failed and False in cfg.compile:
            continue  # compile failed before: this setting's eager row is measured anyway
        compiled = compiled and not compile_failed
        key = (dname, nhwc, compiled, mode)
        if not budget.allows(key, batch):
            skipped.append(f"{mode} {batch}")
            continue
        r, failure = measure_setting(model, mode, batch, ctx, cfg, dname, compiled, nhwc)
        if failure:
            notes.append(f"{name}: torch.compile failed ({failure}); its rows are eager measurements (compile=False)")
            compile_failed, compiled, key = True, False, (dname, nhwc, False, mode)
            if False in cfg.compile:
                continue
            r, _ = measure_setting(model, mode, batch, ctx, cfg, dname, False, nhwc)
        if r is None:
            oom.append(f"{mode} {batch}")
            continue
        budget.record(key, batch, r["step_ms_median"])
        rows.append({**static, **r, "model": name, "mode": mode, "dtype": dtype_label(amp_dtype(ctx.device, dname, mode == "train")),
                     "batch_size": batch, "compile": compiled, "compile_mode": cfg.compile_mode if compiled else "",
                     "channels_last": nhwc})  # fmt: skip
    if skipped:
        notes.append(f"{name}: skipped (max_seconds = {cfg.max_seconds:g} spent or projected to overrun): {', '.join(skipped)}")
    if oom:
        notes.append(f"{name}: out of memory, skipped: {', '.join(oom)}")
    return rows


COLUMNS = ["model", "mode", "device", "dtype", "batch_size", "samples_per_sec", "step_ms_median", "step_ms_iqr",
           "peak_mem_mb", "params", "macs_per_sample", "compile", "compile_mode", "compile_s", "channels_last",
           "routing_iters", "repeats", "seed",
           "device_name", "cpu_count", "torch_version", "cuda_version"]  # fmt: skip
ROUTING_COLUMNS = ["model", "routing_iters", "mode", "batch_size", "samples_per_sec", "step_ms_median", "step_ms_iqr",
                   "dtype", "device", "seed"]  # fmt: skip


def measure_setting(model: BenchModel, mode: str, batch: int, ctx: RunContext, cfg: ThroughputConfig, dname: str,
                    compiled: bool, channels_last: bool) -> tuple[dict[str, float] | None, str]:  # fmt: skip
    """(``measure``'s result, "") or, when torch.compile fails, (None, what failed)."""
    options = StepOptions(ctx.device, amp_dtype(ctx.device, dname, mode == "train"), compiled, cfg.compile_mode, channels_last)
    try:
        return measure(model, mode, batch, options, cfg, ctx.seed, ctx.channels), ""
    except CompileFailed as e:
        return None, str(e)
    except Exception as e:  # compile is optional; errors in eager mode are bugs and propagate
        if not compiled:
            raise
        return None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def with_routing_iters(name: str, tm: Any, iters: int, device: torch.device) -> BenchModel:
    """The same trained weights with another number of routing iterations (no parameter shape
    depends on it). Built from the run's model options, or the model's own config."""
    options = tm.meta.get("options") or dataclasses.asdict(tm.model.cfg)
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not move the seeded RNG
        variant = build_model(tm.meta.get("model", name), **{**options, "routing_iters": iters})
    variant.load_state_dict(tm.model.state_dict())
    return variant.to(device).eval()


def routing_sweep(name: str, tm: Any, ctx: RunContext, cfg: ThroughputConfig, notes: list[str]) -> list[dict[str, Any]]:
    """CapsNet images/s at ``routing_batch_size`` for each routing-iteration count (first dtype, eager)."""
    batch = cfg.routing_batch_size
    budget, rows, skipped = Budget(cfg.max_seconds, cfg.warmup + cfg.repeats), [], []
    for iters in tqdm(sorted(set(cfg.routing_iters)), desc=f"routing {name}", disable=not ctx.progress,
                      file=sys.stderr, dynamic_ncols=True):  # fmt: skip
        variant = with_routing_iters(name, tm, iters, ctx.device)
        for mode in cfg.modes:
            dtype = amp_dtype(ctx.device, cfg.dtypes[0], mode == "train")
            options = StepOptions(ctx.device, dtype)
            allowed = budget.allows(mode, batch)
            r = measure(variant, mode, batch, options, cfg, ctx.seed, ctx.channels) if allowed else None
            if r is None:
                skipped.append(f"{mode} x{iters}")
                continue
            budget.record(mode, batch, r["step_ms_median"])
            rows.append({"model": name, "routing_iters": iters, "mode": mode, "batch_size": batch,
                         **{k: r[k] for k in ("samples_per_sec", "step_ms_median", "step_ms_iqr")},
                         "dtype": dtype_label(dtype), "device": str(ctx.device), "seed": ctx.seed})  # fmt: skip
    if skipped:
        notes.append(f"{name} routing sweep: skipped (time budget or out of memory): {', '.join(skipped)}")
    return rows


THROUGHPUT_TABLES = {"throughput": COLUMNS, "throughput_routing": ROUTING_COLUMNS}


SIZING = {
    "smoke": dict(batch_sizes=[8], repeats=2, warmup=1, routing_iters=[1, 2], routing_batch_size=8),
    "quick": dict(batch_sizes=[16, 64], repeats=5, warmup=1, routing_iters=[1, 3], routing_batch_size=32),
    "standard": dict(batch_sizes=[16, 64, 128], repeats=5, warmup=1, routing_iters=[1, 3], routing_batch_size=32),
}  # fmt: skip
SPEEDS = "Speeds: images/s at the best batch size measured, median of the repeats."
HEADLINE = [Headline("train img/s", "train_images_per_s", "throughput", {"mode": "train"}, kind="speed", about=SPEEDS),
            Headline("inference img/s", "inference_images_per_s", "throughput", {"mode": "inference"}, kind="speed",
                     about=SPEEDS)]  # fmt: skip


# Any dataset: random inputs of the dataset's shape
@part("throughput", ThroughputConfig, THROUGHPUT_TABLES, needs_training=False, per_seed=False, sizing=SIZING,
      headline=HEADLINE, datasets=None)
def run_throughput(ctx: RunContext, cfg: ThroughputConfig) -> PartResult:
    """Time every model over batch sizes, modes, dtypes and compile settings; sweep CapsNet's routing."""
    info, rows, routing_rows, notes = run_info(ctx), [], [], []
    for name, tm in ctx.models.items():
        rows += sweep_model(name, tm.model, ctx, cfg, info, notes)
        if routing_iters_of(tm.model) is not None:
            routing_rows += routing_sweep(name, tm, ctx, cfg, notes)
    df = pd.DataFrame(rows, columns=COLUMNS)
    routing = pd.DataFrame(routing_rows, columns=ROUTING_COLUMNS)
    tables, figures = {"throughput": df}, {}
    if not df.empty:
        figures["throughput"] = throughput_figure(df, info["device_name"], cfg)
    if not routing.empty:
        tables["throughput_routing"] = routing
        figures["throughput_routing"] = routing_figure(routing, info["device_name"])
    return PartResult(tables, figures, summary(df, routing, info, cfg, notes), macs_checks(ctx, df))


def is_paper_capsnet(model: BenchModel) -> bool:
    """The paper's MNIST CapsNet at 28x28, the configuration whose MACs the facts file states."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, CapsNetConfig):
        return False
    return weight_fields(cfg) == weight_fields(CapsNetConfig())  # speed options aside


def macs_checks(ctx: RunContext, df: pd.DataFrame) -> list[Check]:
    """Informational: the counted MACs of the paper CapsNet match the facts file's 203M (a
    counting or architecture bug would show here)."""
    checks = []
    for name, tm in ctx.models.items():
        rows = df[df.model == name]
        if is_paper_capsnet(tm.model) and not rows.empty:
            macs = float(rows.macs_per_sample.iloc[0])
            checks.append(Check(f"{name}: MACs per 28x28 image within 10% of the paper CapsNet's 203M",
                                abs(macs / PAPER_MACS - 1) <= 0.10, f"{macs / 1e6:.1f}M counted vs 203M"))  # fmt: skip
    return checks


def series_label(df: pd.DataFrame) -> pd.Series:
    """Model name, plus dtype and compile when the run has more than one of them."""
    label = df["model"].astype(str)
    if df["dtype"].nunique() > 1:
        label = label + " " + df["dtype"]
    if df["compile"].nunique() > 1:
        label = label + df["compile"].map({True: " compiled", False: " eager"})
    if df["channels_last"].nunique() > 1:
        label = label + df["channels_last"].map({True: " NHWC", False: ""})
    return label


def throughput_figure(df: pd.DataFrame, device_name: str, cfg: ThroughputConfig) -> Figure:
    """Images/s against batch size, log axes; colour = model, line style = mode."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    data = df.assign(series=series_label(df))
    sns.lineplot(data=data, x="batch_size", y="samples_per_sec", hue="series", style="mode", markers=True,
                 estimator=None, ax=ax)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(df.batch_size.unique()), [str(b) for b in sorted(df.batch_size.unique())])
    ax.xaxis.set_minor_locator(NullLocator())
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title_fontsize=8)
    ax.set(xlabel="batch size (images per step)", ylabel="throughput (images/s, median)",
           title=f"Throughput on {device_name}\ntrain = forward+loss+backward+Adam, inference = no-grad forward; "
                 f"median of {cfg.repeats} steps")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    return fig


def routing_figure(df: pd.DataFrame, device_name: str) -> Figure:
    """CapsNet images/s against routing iterations, one panel per mode (same weights)."""
    modes = list(dict.fromkeys(df["mode"]))
    fig = Figure(figsize=(5 * len(modes), 4), layout="constrained")
    for ax, mode in zip(fig.subplots(1, len(modes), squeeze=False)[0], modes):
        sns.lineplot(data=df[df["mode"] == mode], x="routing_iters", y="samples_per_sec", hue="model", marker="o",
                     estimator=None, ax=ax)  # fmt: skip
        ax.set(xlabel="routing iterations", ylabel="throughput (images/s, median)", title=mode,
               xticks=sorted(df.routing_iters.unique()))  # fmt: skip
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"CapsNet cost vs routing iterations (batch {int(df.batch_size.iloc[0])}, "
                 f"{df.dtype.iloc[0]}, same weights) on {device_name}", fontsize=9)  # fmt: skip
    return fig


def best_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model/mode/dtype/compile: best images/s and its batch, the batch-128 numbers, cost."""
    out = []
    keys = ["model", "mode", "dtype", "compile", "channels_last"]
    for (model, mode, dtype, compiled, nhwc), g in df.groupby(keys, sort=False):
        best, at128 = g.loc[g.samples_per_sec.idxmax()], g[g.batch_size == 128]
        row = {"model": model, "mode": mode, "dtype": dtype, "compile": best.compile_mode if compiled else "off",
               "channels_last": nhwc,
               "best images/s": f"{best.samples_per_sec:,.0f} (batch {best.batch_size})",
               "images/s at batch 128": f"{at128.samples_per_sec.iloc[0]:,.0f}" if len(at128) else "not measured",
               "ms/step at 128 (IQR)": f"{at128.step_ms_median.iloc[0]:.2f} ({at128.step_ms_iqr.iloc[0]:.2f})" if len(at128) else "-",
               "peak MiB at 128": f"{at128.peak_mem_mb.iloc[0]:,.0f}" if len(at128) and not math.isnan(at128.peak_mem_mb.iloc[0]) else "-",
               "MMACs/image": f"{best.macs_per_sample / 1e6:.3g}", "params": f"{best.params:,}"}  # fmt: skip
        out.append(row)
    return pd.DataFrame(out)


def routing_table(routing: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, routing iterations); images/s and ms/step (IQR) per mode."""
    out = []
    for (model, iters), g in routing.groupby(["model", "routing_iters"]):
        row: dict[str, Any] = {"model": model, "routing iterations": iters}
        for r in g.itertuples():
            row[f"{r.mode} images/s"] = f"{r.samples_per_sec:,.0f}"
            row[f"{r.mode} ms/step (IQR)"] = f"{r.step_ms_median:.2f} ({r.step_ms_iqr:.2f})"
        out.append(row)
    return pd.DataFrame(out).fillna("-")


def summary(df: pd.DataFrame, routing: pd.DataFrame, info: dict[str, Any], cfg: ThroughputConfig,
            notes: list[str]) -> str:  # fmt: skip
    cuda = f", CUDA {info['cuda_version']}" if info["cuda_version"] else ""
    dtypes = ", ".join(sorted(set(df.dtype))) if not df.empty else "-"
    out = ["## Throughput", "",
           f"Device: {info['device_name']}; {info['cpu_count']} CPU cores, {torch.get_num_threads()} torch threads; "
           f"torch {info['torch_version']}{cuda}. Autocast dtype: {dtypes}; torch.compile: {cfg.compile} (mode "
           f"{cfg.compile_mode}); channels_last: {cfg.channels_last}; CPU allocator: "
           f"{'tuned (freed memory kept mapped)' if cpu_allocator_tuned() else 'default'}.", "",
           f"Protocol: random inputs resident on the device; train = forward, the model's own loss, backward and an "
           f"Adam step on a copy of the model (trained weights untouched), the training loop's own step; inference = "
           f"eval-mode forward without gradients. A compiled setting compiles forward and loss as one graph; its "
           f"first call (the compile) is timed apart as compile_s. Warm-up steps: {cfg.warmup}; then the median (and IQR) of {cfg.repeats} timed steps, each "
           f"ended by a device synchronization; images/s = batch / median. Peak memory (CUDA only; NaN on the CPU) "
           f"is the peak allocated during a setting above what was already allocated. MACs count matrix products "
           f"and convolutions of one forward (not elementwise work such as squash, softmax, pooling), as the paper's "
           f"network computes them: CapsNet's spectral PrimaryCaps (the CPU default) runs about a quarter of its "
           f"MACs; the model options actually used (primary_conv, routing_chunk) are in config.toml.", ""]  # fmt: skip
    if not df.empty:
        out += ["Best throughput per model and mode:", "", markdown_table(best_table(df)), ""]
    if not routing.empty:
        out += [f"CapsNet cost by routing iterations (same weights, batch {cfg.routing_batch_size}, "
                f"{routing.dtype.iloc[0]}, eager):", "", markdown_table(routing_table(routing)), ""]  # fmt: skip
    out += [f"- {n}" for n in notes]
    return "\n".join(out).rstrip() + "\n"
