"""One timing recipe (timm benchmark.py / torch.utils.benchmark style): warm-up, synchronise,
timed repetitions each closed by a synchronisation; report the median and the IQR."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)  # device work is asynchronous: wait before reading the clock
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median, first and third quartiles and IQR (inclusive quantiles) of ``times``."""
    if len(times) == 1:
        return {"median": times[0], "q1": times[0], "q3": times[0], "iqr": 0.0}
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": statistics.median(times), "q1": q1, "q3": q3, "iqr": q3 - q1}


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward on ``x`` (FLOP counter / 2). Counts matrix products
    and convolutions; elementwise work (squash, softmax, ReLU) is not counted."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated device memory since the last reset (CUDA); NaN on the CPU, where no
    per-region measure exists (the process-wide high-water mark would mislead)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return float("nan")
