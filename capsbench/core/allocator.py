"""glibc allocator settings for CPU runs (no torch import: the command line calls this first)."""

from __future__ import annotations

import ctypes
import os
import sys

ALLOCATOR_ENV = "CAPSBENCH_CPU_ALLOCATOR"  # "default" leaves glibc's malloc settings alone
_allocator_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of handing it back to the kernel (glibc).

    PyTorch's CPU tensors come straight from malloc, and glibc returns every block over a few
    MB to the kernel when it is freed, so each training step page-faults its activations in
    afresh: on 2 cores that cost CapsNet about a third of its step time. Raising the mmap and
    trim thresholds to 1 GiB keeps the memory mapped between steps. The process then holds on
    to its peak memory. Called by the command line, not on import; opt out with
    CAPSBENCH_CPU_ALLOCATOR=default. Returns whether the settings are in force."""
    global _allocator_tuned
    if _allocator_tuned or os.environ.get(ALLOCATOR_ENV, "tuned") == "default" or not sys.platform.startswith("linux"):
        return _allocator_tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
    _allocator_tuned = bool(libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**30))
    return _allocator_tuned


def cpu_allocator_tuned() -> bool:
    return _allocator_tuned
