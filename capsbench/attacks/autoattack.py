"""AutoAttack's "standard" composition (Croce & Hein, ICML 2020), L-inf: APGD-CE, APGD-T
(targeted DLR over the top classes) and Square, in sequence, each run only on the images every
earlier attack failed on; robust accuracy is over all evaluated images. FAB-T, the reference's
third attack, is left out (it rarely changes the result after APGD-T; the reference reports it
second-to-last). Budgets are arguments: the reference's are 100 steps, 9 targets, 5,000 queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from capsbench.attacks.apgd import APGD, TargetedAPGD
from capsbench.attacks.base import Attack, model_device
from capsbench.attacks.square import Square
from capsbench.models import BenchModel
from capsbench.models.scoring import batch_predictions

STANDARD = ("apgd-ce", "apgd-t", "square")


@dataclass(frozen=True)
class Budget:
    steps: int = 100  # APGD iterations
    targets: int = 9  # APGD-T target classes
    restarts: int = 1  # APGD-CE restarts
    queries: int = 5000  # Square queries


@dataclass
class Outcome:
    """What a composition found on N images."""

    adv: Tensor  # (N, 1, S, S) the first successful image per example, else the input
    clean: Tensor  # (N,) bool: correct on the clean input
    robust_after: dict[str, Tensor] = field(default_factory=dict)  # stage -> (N,) bool, cumulative


def stage_attack(name: str, model: BenchModel, eps: float, budget: Budget, dtype: torch.dtype | None,
                 batch_size: int | None) -> Attack:  # fmt: skip
    if name == "apgd-ce":
        return APGD(model, eps, dtype, batch_size, "ce", steps=budget.steps, restarts=budget.restarts)
    if name == "apgd-dlr":
        return APGD(model, eps, dtype, batch_size, "dlr", steps=budget.steps, restarts=budget.restarts)
    if name == "apgd-t":
        return TargetedAPGD(model, eps, dtype, batch_size, "dlr", steps=budget.steps, targets=budget.targets)
    if name == "square":
        return Square(model, eps, dtype, batch_size, "cw", queries=budget.queries)
    raise ValueError(f"unknown AutoAttack stage {name!r}; known: apgd-ce, apgd-dlr, apgd-t, square")


class AutoAttack:
    """Run ``stages`` in sequence on the still-robust images (one host sync per stage, none
    inside an attack). ``on_step(stage)``, if given, is called after every gradient or query
    on a batch (a progress bar)."""

    def __init__(self, model: BenchModel, eps: float, budget: Budget = Budget(), dtype: torch.dtype | None = None,
                 batch_size: int | None = None, stages: tuple[str, ...] = STANDARD,
                 on_step: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.model, self.eps, self.dtype, self.batch_size = model, eps, dtype, batch_size
        self.attacks = {s: stage_attack(s, model, eps, budget, dtype, batch_size) for s in stages}
        for name, attack in self.attacks.items():
            attack.on_step = partial(on_step, name) if on_step is not None else None

    def predict(self, x: Tensor) -> Tensor:
        return batch_predictions(self.model, x, self.batch_size, self.dtype)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Outcome:
        x, y = x.to(model_device(self.model)).float(), y.to(model_device(self.model))
        robust = self.predict(x) == y  # (N,) bool
        out = Outcome(x.clone(), robust.clone())
        for name, attack in self.attacks.items():
            idx = robust.nonzero().squeeze(1)  # the one host sync of the stage
            if len(idx) and self.eps > 0:
                adv = attack(x[idx], y[idx], generator)
                hit = self.predict(adv) != y[idx]  # scored again: the images are what counts
                out.adv[idx[hit]] = adv[hit]
                robust[idx[hit]] = False
            out.robust_after[name] = robust.clone()
        return out
