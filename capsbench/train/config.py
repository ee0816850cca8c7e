"""Training configuration and presets (presets live in presets.toml, not in code)."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from importlib import resources

import torch
from typing import Any

from capsbench.core.config import from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.train.step import check_compile_mode

AUGMENTS = ("shift", "canvas", "none")


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run. Paper schedule by default (Adam 1e-3, 0.96 per 2000 steps)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.96  # multiplied into the lr every lr_decay_steps, continuously
    lr_decay_steps: int = 2000
    seed: int = 0
    augment: str = "shift"  # shift: +-max_shift px on 28x28; canvas: random place on canvas^2; none
    max_shift: int = 2
    canvas: int = 40
    train_subset: int = 0  # 0 = all 60000 training images
    test_subset: int = 0  # 0 = all 10000 test images (for the accuracy printed while training)
    log_every: int = 50  # steps between host reads of loss/accuracy (the only syncs)
    checkpoint_every: int = 1000
    amp: str = "auto"  # auto (bf16 on CUDA), bf16, off
    compile: bool = False  # torch.compile forward + loss (falls back to eager with a notice)
    compile_mode: str = "default"  # inductor mode; reduce-overhead / max-autotune add CUDA graphs on a GPU
    channels_last: bool = False  # NHWC convolution weights and inputs (cuDNN's tensor-core layout)
    description: str = ""

    def validate(self, where: str = "train") -> None:
        positive = ("steps", "batch_size", "lr_decay_steps", "log_every", "checkpoint_every", "canvas")
        for key in positive:
            if getattr(self, key) <= 0:
                raise CapsbenchError(f"{where}.{key} must be > 0, got {getattr(self, key)}")
        if self.lr <= 0 or not 0 < self.lr_decay <= 1:
            raise CapsbenchError(f"{where}: lr must be > 0 and lr_decay in (0, 1], got {self.lr}, {self.lr_decay}")
        if self.augment not in AUGMENTS:
            raise CapsbenchError(f"{where}.augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.max_shift < 0 or self.train_subset < 0 or self.test_subset < 0:
            raise CapsbenchError(f"{where}: max_shift, train_subset and test_subset must be >= 0")
        if self.augment == "canvas" and self.canvas < 28:
            raise CapsbenchError(f"{where}.canvas must be >= 28 (the digit is 28x28), got {self.canvas}")
        if self.amp not in ("auto", "bf16", "off"):
            raise CapsbenchError(f"{where}.amp must be auto, bf16 or off, got {self.amp!r}")
        check_compile_mode(self.compile_mode, f"{where}.compile_mode")

    @property
    def input_size(self) -> int:
        return self.canvas if self.augment == "canvas" else 28

    def weight_key(self) -> dict[str, Any]:
        """The fields that determine the trained weights (logging and checkpoint cadence do not)."""
        d = asdict(self)
        for k in ("log_every", "checkpoint_every", "test_subset", "compile", "compile_mode", "channels_last",
                  "description"):  # fmt: skip
            d.pop(k)
        return d


def load_presets() -> dict[str, dict[str, Any]]:
    text = resources.files("capsbench.train").joinpath("presets.toml").read_text()
    return tomllib.loads(text)


def preset_names() -> list[str]:
    return list(load_presets())


def train_config(preset: str, **overrides: Any) -> TrainConfig:
    """The preset's TrainConfig with ``overrides`` applied (unknown keys and bad values refused)."""
    presets = load_presets()
    if preset not in presets:
        raise CapsbenchError(f"unknown preset {preset!r}; known presets: {', '.join(presets)}")
    base = from_dict(TrainConfig, presets[preset], where=f"preset {preset}")
    return from_dict(TrainConfig, overrides, where="train", base=base)


def default_preset(device: torch.device) -> str:
    """``full`` on a GPU (the paper's protocol length), ``quick`` on a CPU."""
    return "full" if device.type == "cuda" else "quick"
