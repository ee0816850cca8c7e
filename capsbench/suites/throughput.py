"""The throughput part: training and inference images/s over batch sizes (median and IQR of
the step time), peak memory, parameters, MACs per image, and CapsNet's cost as the number of
routing iterations grows. Timing follows capsbench.timing's one recipe."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from capsbench.device import autocast, describe
from capsbench.errors import CapsbenchError
from capsbench.models import BenchModel
from capsbench.suites.base import PARTS, Check, PartResult, RunContext
from capsbench.summary import markdown_table
from capsbench.timing import count_macs, peak_memory_mb, reset_peak_memory, summarize, time_fn

MODES = ("train", "inference")
DTYPES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ThroughputConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32, 128, 512])
    warmup: int = 3
    repeats: int = 10
    modes: list[str] = field(default_factory=lambda: ["train", "inference"])
    routing_iters: list[int] = field(default_factory=lambda: [1, 2, 3, 5])  # CapsNet cost vs iterations
    routing_batch_size: int = 128
    dtypes: list[str] = field(default_factory=lambda: ["auto"])  # auto: bf16 on CUDA, fp32 on the CPU
    compile: list[bool] = field(default_factory=lambda: [False])
    max_seconds: float = 120.0  # per model: larger batch sizes are skipped once this is spent

    def validate(self, where: str) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise CapsbenchError(f"{where}.batch_sizes must be a non-empty list of integers >= 1, got {self.batch_sizes}")
        if self.warmup < 0 or self.repeats < 1 or self.routing_batch_size < 1:
            raise CapsbenchError(f"{where}: warmup must be >= 0, repeats >= 1 (5+ recommended), routing_batch_size >= 1")
        if not self.modes or set(self.modes) - set(MODES):
            raise CapsbenchError(f"{where}.modes must be a subset of {list(MODES)}, got {self.modes}")
        if any(r < 1 for r in self.routing_iters):
            raise CapsbenchError(f"{where}.routing_iters must all be >= 1, got {self.routing_iters}")
        if not self.dtypes or set(self.dtypes) - set(DTYPES):
            raise CapsbenchError(f"{where}.dtypes must be a subset of {list(DTYPES)}, got {self.dtypes}")
        if self.max_seconds <= 0:
            raise CapsbenchError(f"{where}.max_seconds must be > 0")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if name == "bf16" else None


def step_fn(model: BenchModel, mode: str, batch: int, device: torch.device, dtype, compiled: bool,
            gen: torch.Generator) -> Callable[[], Any]:  # fmt: skip
    """A closure doing one training step (on a copy of the model) or one inference forward."""
    S = model.input_size
    x = torch.rand(batch, 1, S, S, device=device, generator=gen)  # resident on the device
    y = torch.randint(0, model.num_classes, (batch,), device=device, generator=gen)
    m = copy.deepcopy(model)  # the trained weights are never touched
    fwd = torch.compile(m) if compiled else m
    if mode == "inference":
        m.eval()

        def infer() -> Any:
            with torch.no_grad(), autocast(device, dtype):
                return fwd(x)

        return infer
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3, fused=device.type == "cuda")

    def train() -> Any:
        with autocast(device, dtype):
            out = fwd(x, y)
            loss = m.objective(out, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return train


def measure(model: BenchModel, mode: str, batch: int, ctx: RunContext, cfg: ThroughputConfig, dtype,
            compiled: bool) -> dict[str, float] | None:  # fmt: skip
    """Timed steps of one setting; None when it does not fit in memory."""
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    try:
        reset_peak_memory(ctx.device)
        fn = step_fn(model, mode, batch, ctx.device, dtype, compiled, gen)
        t0 = time.perf_counter()
        compile_s = math.nan
        if compiled:
            fn()
            compile_s = time.perf_counter() - t0
        times = time_fn(fn, cfg.warmup, cfg.repeats, ctx.device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    s = summarize(times)
    return {"samples_per_sec": batch / s["median"], "step_ms_median": 1000 * s["median"], "step_ms_iqr": 1000 * s["iqr"],
            "peak_mem_mb": peak_memory_mb(ctx.device), "compile_s": compile_s}  # fmt: skip


def run_throughput(ctx: RunContext, cfg: ThroughputConfig) -> PartResult:
    meta = {"device": str(ctx.device), "device_name": describe(ctx.device), "cpu_count": os.cpu_count(),
            "torch_version": str(torch.__version__), "cuda_version": torch.version.cuda if ctx.device.type == "cuda" else None}  # fmt: skip
    rows, routing_rows, notes = [], [], []
    for name, tm in ctx.models.items():
        model = tm.model
        S = model.input_size
        macs = count_macs(model.eval(), torch.rand(2, 1, S, S, device=ctx.device)) / 2
        iters = getattr(getattr(model, "cfg", None), "routing_iters", math.nan)
        settings = [(d, c, m, b) for d in cfg.dtypes for c in cfg.compile for m in cfg.modes for b in sorted(cfg.batch_sizes)]
        started = time.perf_counter()
        for dname, compiled, mode, batch in tqdm(settings, desc=f"throughput {name}", disable=not ctx.progress):
            if time.perf_counter() - started > cfg.max_seconds:
                notes.append(f"{name}: {dname} {mode} batch {batch} skipped (max_seconds {cfg.max_seconds} spent)")
                continue
            r = _measure_or_eager(model, mode, batch, ctx, cfg, dname, compiled, notes, name)
            if r is None:
                continue
            rows.append({"model": name, "mode": mode, **{k: meta[k] for k in ("device",)}, "dtype": _dtype_label(dname, ctx),
                         "batch_size": batch, **{k: r[k] for k in ("samples_per_sec", "step_ms_median", "step_ms_iqr", "peak_mem_mb")},
                         "params": model.num_params(), "macs_per_sample": macs, "compile": r["compiled"], "compile_s": r["compile_s"],
                         "routing_iters": iters, "repeats": cfg.repeats, "seed": ctx.seed,
                         **{k: meta[k] for k in ("device_name", "cpu_count", "torch_version", "cuda_version")}})  # fmt: skip
        if hasattr(model, "cfg") and hasattr(model.cfg, "routing_iters"):
            routing_rows += routing_cost(name, tm, ctx, cfg)
    df, routing = pd.DataFrame(rows), pd.DataFrame(routing_rows)
    tables = {"throughput": df}
    if not routing.empty:
        tables["throughput_routing"] = routing
    figures = {"throughput": throughput_figure(df, meta)} if not df.empty else {}
    if not routing.empty:
        figures["throughput_routing"] = routing_figure(routing, meta)
    return PartResult(tables, figures, summary(df, routing, meta, notes), macs_check(ctx, df))


def _dtype_label(dname: str, ctx: RunContext) -> str:
    return "bf16" if resolve_dtype(dname, ctx.device) is torch.bfloat16 else "fp32"


def _measure_or_eager(model, mode, batch, ctx, cfg, dname, compiled, notes, name):
    dtype = resolve_dtype(dname, ctx.device)
    try:
        r = measure(model, mode, batch, ctx, cfg, dtype, compiled)
    except Exception as e:  # compile is optional: fall back to eager with one notice
        if not compiled:
            raise
        notes.append(f"{name}: torch.compile failed ({type(e).__name__}); measured eagerly instead")
        print(f"notice: torch.compile failed for {name} ({type(e).__name__}); measuring eagerly", file=sys.stderr)
        r, compiled = measure(model, mode, batch, ctx, cfg, dtype, False), False
    if r is None:
        notes.append(f"{name}: {mode} batch {batch} ran out of device memory; skipped")
        return None
    return {**r, "compiled": compiled}


def routing_cost(name: str, tm, ctx: RunContext, cfg: ThroughputConfig) -> list[dict]:
    """The same trained weights run with 1, 2, 3, 5... routing iterations."""
    rows = []
    for r in cfg.routing_iters:
        variant = type(tm.model)(dataclasses.replace(tm.model.cfg, routing_iters=r))
        variant.load_state_dict(tm.model.state_dict())  # iterations change no parameter shapes
        variant.to(ctx.device)
        for mode in cfg.modes:
            dtype = resolve_dtype(cfg.dtypes[0], ctx.device)
            m = measure(variant, mode, cfg.routing_batch_size, ctx, cfg, dtype, False)
            if m is not None:
                rows.append({"model": name, "routing_iters": r, "mode": mode, "batch_size": cfg.routing_batch_size,
                             "samples_per_sec": m["samples_per_sec"], "step_ms_median": m["step_ms_median"],
                             "step_ms_iqr": m["step_ms_iqr"], "dtype": _dtype_label(cfg.dtypes[0], ctx), "device": str(ctx.device)})  # fmt: skip
    return rows


def macs_check(ctx: RunContext, df: pd.DataFrame) -> list[Check]:
    """The paper CapsNet at 28x28 should count about 203M MACs per image (capsnet-facts.md)."""
    checks = []
    for name, tm in ctx.models.items():
        cfg = getattr(tm.model, "cfg", None)
        if name == "capsnet" and cfg is not None and cfg.input_size == 28 and cfg.conv_channels == 256 and not df.empty:
            macs = float(df[df.model == name].macs_per_sample.iloc[0])
            checks.append(Check("capsnet MACs per 28x28 image within 10% of the paper's 203M", abs(macs / 203e6 - 1) < 0.10,
                                f"{macs / 1e6:.1f}M"))  # fmt: skip
    return checks


def throughput_figure(df: pd.DataFrame, meta: dict) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for (model, mode), g in df.groupby(["model", "mode"]):
        g = g.sort_values("batch_size")
        ax.plot(g.batch_size, g.samples_per_sec, marker="o", linestyle="-" if mode == "train" else "--", label=f"{model} {mode}")
    ax.set(xscale="log", yscale="log", xlabel="batch size (images)", ylabel="images / s (median)",
           title=f"Throughput on {meta['device_name']}")  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def routing_figure(df: pd.DataFrame, meta: dict) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for (model, mode), g in df.groupby(["model", "mode"]):
        ax.plot(g.routing_iters, g.samples_per_sec, marker="o", label=f"{model} {mode}")
    ax.set(xlabel="routing iterations", ylabel="images / s (median)", ylim=(0, None),
           title=f"CapsNet cost vs routing iterations (batch {int(df.batch_size.iloc[0])}, {meta['device_name']})")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def summary(df: pd.DataFrame, routing: pd.DataFrame, meta: dict, notes: list[str]) -> str:
    out = ["## Throughput", "",
           f"Device: {meta['device_name']}; torch {meta['torch_version']}"
           f"{', CUDA ' + str(meta['cuda_version']) if meta['cuda_version'] else ''}. Inputs resident on the device; "
           "train = forward, loss, backward and an Adam step; inference = forward without gradients. Median of the timed "
           "steps after warm-up (IQR beside it); MACs count matrix products and convolutions only.", ""]  # fmt: skip
    if not df.empty:
        cols = ["model", "mode", "dtype", "compile", "batch_size", "samples_per_sec", "step_ms_median", "step_ms_iqr",
                "peak_mem_mb", "params", "macs_per_sample"]  # fmt: skip
        t = df[cols].assign(samples_per_sec=df.samples_per_sec.round(1), step_ms_median=df.step_ms_median.round(2),
                            step_ms_iqr=df.step_ms_iqr.round(2), macs_per_sample=(df.macs_per_sample / 1e6).round(1).astype(str) + "M")  # fmt: skip
        out += [markdown_table(t), ""]
    if not routing.empty:
        out += ["CapsNet images/s by routing iterations:", "", markdown_table(routing.round(2)), ""]
    out += [f"- {n}" for n in notes]
    return "\n".join(out)


PARTS.register("throughput", needs_training=False)((ThroughputConfig, run_throughput))
