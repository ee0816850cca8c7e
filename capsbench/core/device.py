"""Device choice and mixed precision, in one place."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from capsbench.core.config import PRECISION_ALIASES
from capsbench.core.errors import CapsbenchError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise CapsbenchError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CapsbenchError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (``core.config.Precision``, checked where configs are
    read): ``auto`` is bf16 on CUDA and full fp32 on the CPU (CPU bf16 is slower without AMX);
    None means fp32, no autocast."""
    precision = PRECISION_ALIASES.get(precision, precision)  # a config built without from_dict may hold "off"
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe(device: torch.device) -> str:
    """Human-readable device name (GPU model or CPU model with core count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
