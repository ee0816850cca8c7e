"""PGD / BIM: iterated signed-gradient steps projected onto the L-inf ball."""

from __future__ import annotations

import torch
from torch import Tensor

from capsbench.attacks.base import ATTACKS, Attack
from capsbench.models import BenchModel


def madry_step(eps: float, steps: int, step_size: float = 0.0) -> float:
    """``step_size``, or when it is 0, Madry et al.'s 2.5 * eps / steps."""
    return step_size if step_size > 0 else 2.5 * eps / steps


@ATTACKS.register("pgd")
class PGD(Attack):
    """Iterative L-inf attack: BIM (Kurakin et al. 2017) by default, i.e. PGD (Madry et al.
    2018) without a random start; ``random_start=True`` gives Madry's PGD. Each of ``steps``
    steps moves ``step_size`` along the gradient sign, then projects onto the eps-ball and
    [0, 1]. ``step_size=0`` means 2.5 * eps / steps (Madry et al.'s rule)."""

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, loss: str | None = None, steps: int = 10,
                 step_size: float = 0.0, random_start: bool = False) -> None:  # fmt: skip
        super().__init__(model, eps, dtype, batch_size, loss)
        if steps < 1 or step_size < 0:
            raise ValueError(f"PGD needs steps >= 1 and step_size >= 0, got {steps}, {step_size}")
        self.steps = steps
        self.step_size = madry_step(self.eps, steps, step_size)
        self.random_start = random_start

    def start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if not self.random_start:
            return x
        noise = torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1
        return (x + self.eps * noise).clamp(0, 1)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        adv = self.start(x, generator)
        for _ in range(self.steps):
            adv = self.step(adv, x, self.loss_grad(adv, y, target))
        return adv

    def step(self, adv: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        """One signed step, the perturbation clipped to the eps-ball, then the image to [0, 1]
        (Madry et al.'s form, bit for bit the one torchattacks uses)."""
        adv = adv + self.step_size * grad.sign()
        return (x + (adv - x).clamp(-self.eps, self.eps)).clamp(0, 1)
