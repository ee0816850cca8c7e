"""Square attack (Andriushchenko et al., ECCV 2020), L-inf: score-based and gradient-free, so it
is the gradient-masking check. A model that resists the gradient attacks but not Square has
gradients that mislead them.

Following the reference (L-inf, fra31/auto-attack): start from vertical stripes of +-eps; each
query draws, per example, a square of side s at a random place with a random sign +-2 eps,
projects onto the eps-ball (so every pixel stays at a vertex of the ball) and keeps the change
when the loss falls. s shrinks with the query count (p = p_init halved at 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 of 10,000 queries, rescaled to the budget). The loss to
decrease is minus the attack loss (``cw``: the margin z_y - max_{i != y} z_i). Per example,
on the device, no host syncs inside the queries; an example stops changing once fooled, and
images already misclassified at x are returned unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from capsbench.attacks.base import ATTACKS, Attack, project
from capsbench.models import BenchModel

HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10,000 queries


def square_fraction(i: int, queries: int, p_init: float) -> float:
    """The fraction of pixels a square covers at query ``i`` of ``queries``."""
    it = int(i / queries * 10000)
    return p_init / 2 ** sum(it > h for h in HALVINGS)


def square_masks(side: int, pos: Tensor, batch: int, generator: torch.Generator | None) -> Tensor:
    """(B, 1, S, S) bool: one side x side square per example at a uniform random place; ``pos``
    is arange(S) on the device (made once per attack, not per query)."""
    size = len(pos)
    top = torch.randint(0, size - side + 1, (batch, 1), device=pos.device, generator=generator)
    left = torch.randint(0, size - side + 1, (batch, 1), device=pos.device, generator=generator)
    rows = (pos >= top) & (pos < top + side)  # (B, size)
    cols = (pos >= left) & (pos < left + side)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def random_signs(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    return (torch.rand(shape, device=device, generator=generator) < 0.5).float() * 2 - 1


@ATTACKS.register("square")
class Square(Attack):
    """Square attack, untargeted, ``queries`` forward passes per example (the reference: 5,000)."""

    default_loss = "cw"

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, loss: str | None = None, queries: int = 5000,
                 p_init: float = 0.8) -> None:  # fmt: skip
        super().__init__(model, eps, dtype, batch_size, loss)
        if queries < 1 or not 0 < p_init <= 1:
            raise ValueError(f"Square needs queries >= 1 and 0 < p_init <= 1, got {queries}, {p_init}")
        self.queries, self.p_init = queries, p_init

    def score(self, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """(loss to decrease (B,), still correct (B,) bool), without gradients."""
        with torch.no_grad():
            out = self.forward(x)
            self.stepped()
            return -self.objective(out, x, y, target), self.model.attack_scores(out).argmax(dim=1) == y

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        B, C, H, W = x.shape
        best = project(x + self.eps * random_signs((B, C, 1, W), x.device, generator), x, self.eps)
        loss, correct = self.score(best, y, target)
        pos = torch.arange(H, device=x.device)
        for i in range(self.queries):
            p = square_fraction(i, self.queries, self.p_init)
            side = min(max(round(math.sqrt(p * H * W)), 1), H - 1)
            mask = square_masks(side, pos, B, generator)  # (B, 1, H, W)
            delta = 2 * self.eps * random_signs((B, C, 1, 1), x.device, generator) * mask
            cand = project(best + delta, x, self.eps)
            new_loss, new_correct = self.score(cand, y, target)
            take = (new_loss < loss) & correct  # fooled examples keep their image
            best = torch.where(take.view(-1, 1, 1, 1), cand, best)
            loss = torch.where(take, new_loss, loss)
            correct = torch.where(take, new_correct, correct)
        return self.keep_misclassified(x, y, best)
