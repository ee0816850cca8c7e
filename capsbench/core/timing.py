"""One timing recipe for every speed number in capsbench (timm ``benchmark.py``,
``torch.utils.benchmark``, airbench): warm-up, synchronize, timed repetitions each closed by a
synchronization, then the median and the interquartile range. Plus MAC counting and peak memory."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA kernels run asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Every timed call starts and ends synchronized, so it measures the whole call: Python and
    kernel-launch overhead included (that is what a training loop pays at small batch sizes).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)  # read the clock only once the device has finished the call's work
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles q1/q3 and IQR = q3 - q1 (linear interpolation, as numpy's percentile)."""
    if not times:
        raise ValueError("summarize needs at least one time")
    if len(times) == 1:
        return {"median": times[0], "iqr": 0.0, "q1": times[0], "q3": times[0]}
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": statistics.median(times), "iqr": q3 - q1, "q1": q1, "q3": q3}


def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of the whole batch ``x`` (FlopCounterMode's FLOPs / 2).

    Counted: matrix products and convolutions (mm, addmm, bmm, einsum, conv), biases excluded.
    Not counted: elementwise and reduction work (ReLU, pooling, squash, the routing softmax and
    norms), which is cheap in MACs but can dominate wall time through many small kernels.
    """
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops()) // 2


def reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory window; returns the bytes already allocated (the window's baseline)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_mb(device: torch.device, baseline: int = 0) -> float:
    """Peak allocated CUDA memory since :func:`reset_peak_memory`, less ``baseline`` bytes, in MiB.

    NaN on the CPU: the only cheap measure there (``ru_maxrss``) is a process-wide high-water
    mark that never goes down, so it would not describe the code being timed.
    """
    if device.type != "cuda":
        return float("nan")
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
