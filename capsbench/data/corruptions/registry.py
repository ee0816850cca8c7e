"""The corruption registry that the corruption modules add themselves to."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from capsbench.core.registry import Registry

Corruption = Callable[[Tensor, int, int], Tensor]  # (x (B, 1, 28, 28), seed, start index) -> same shape
CORRUPTIONS: Registry[Corruption] = Registry("corruption")
# The benchmark's 15, in the paper's order (Table 1 of Mu & Gilmer 2019).
NAMES = ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
         "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges")  # fmt: skip


def corruption(name: str, about: str) -> Callable[[Corruption], Corruption]:
    """Register the decorated function as corruption ``name`` with its one-line description."""
    return CORRUPTIONS.register(name, about=about)
