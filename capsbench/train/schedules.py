"""Learning-rate schedules, one registry for every training loop, and the one optimizer (Adam).

A schedule is a multiplier of the peak lr for each optimizer step: an optional linear warmup
(``warmup_steps``), then the registered shape, counted from the warmup's end:

- ``paper``: the paper's continuous exponential decay, x ``lr_decay`` every ``lr_decay_steps``;
- ``onecycle``: cosine from 1 to 0 at ``max_steps`` (the tta part's time-to-accuracy schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from capsbench.core.registry import Registry

SCHEDULES: Registry[Callable[[int, "Schedule"], float]] = Registry("lr schedule")


@dataclass(frozen=True)
class Schedule:
    """Which registered schedule, with its parameters (each schedule reads the ones it needs)."""

    name: str = "paper"
    lr_decay: float = 0.96  # paper: multiplied into the lr every lr_decay_steps, continuously
    lr_decay_steps: int = 2000
    warmup_steps: int = 0  # linear warmup to the peak (0 = none)
    max_steps: int = 0  # onecycle: the step at which the lr reaches 0

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr for the optimizer step with 0-based index ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return SCHEDULES.get(self.name)(step - self.warmup_steps, self)


@SCHEDULES.register("paper")
def paper(k: int, s: Schedule) -> float:
    """x lr_decay every lr_decay_steps, continuously (Adam 1e-3, 0.96 per 2000 steps in the paper)."""
    return s.lr_decay ** (k / s.lr_decay_steps)


@SCHEDULES.register("onecycle")
def onecycle(k: int, s: Schedule) -> float:
    """Cosine from 1 to 0 over the steps after the warmup, 0 from ``max_steps`` on."""
    progress = min(k / max(s.max_steps - s.warmup_steps, 1), 1.0)
    return 0.5 * (1 + math.cos(math.pi * progress))


def describe_schedule(s: Schedule, lr: float) -> str:
    """The schedule in words, for summaries: "Adam, peak lr 0.002, linear warmup over 200 steps, then ..."."""
    steps = f"{s.warmup_steps} step{'s' if s.warmup_steps != 1 else ''}"
    warm = f"linear warmup over {steps}, then " if s.warmup_steps else ""
    shape = {"paper": f"x{s.lr_decay:g} every {s.lr_decay_steps} steps (the paper's, continuous)",
             "onecycle": f"cosine decay to 0 at step {s.max_steps}"}.get(s.name, s.name)  # fmt: skip
    return f"Adam, peak lr {lr:g}, {warm}{shape}"


def make_optimizer(model: torch.nn.Module, lr: float, schedule: Schedule, device: torch.device,
                   ) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:  # fmt: skip
    """Adam at peak lr ``lr`` (fused on CUDA) with ``schedule`` as a LambdaLR."""
    SCHEDULES.get(schedule.name)  # an unknown name fails here, not at the end of the warmup
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type == "cuda")
    # A plain function, not the Schedule itself: LambdaLR saves only callable objects' state
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule.factor(s))
