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


def amp_dtype(device: torch.device, precision: str, training: bool = False) -> torch.dtype | None:
    """The autocast dtype of a precision (``core.config.Precision``, checked where configs are
    read); None means fp32, no autocast. ``auto`` is bf16 on CUDA. On a CPU it is bf16 for
    training where the CPU multiplies bf16 natively (``native_bf16_cpu``: about twice the fp32
    rate of the products that dominate training) and fp32 otherwise, and fp32 for evaluation:
    attacks and accuracies on a CPU keep full precision and the fp32 fast paths."""
    precision = PRECISION_ALIASES.get(precision, precision)  # a config built without from_dict may hold "off"
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if training and native_bf16_cpu() else None
    return {"bf16": torch.bfloat16, "fp32": None}[precision]


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles). Without
    them bf16 products are emulated and slower than fp32, so ``auto`` keeps fp32 there."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def dtype_label(dtype: torch.dtype | None) -> str:
    """How tables name an autocast dtype: "bf16", or "fp32" for none."""
    return "bf16" if dtype is torch.bfloat16 else "fp32"


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
