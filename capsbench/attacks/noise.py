"""Random-sign noise: the non-adversarial baseline (L-inf)."""

from __future__ import annotations

import torch
from torch import Tensor

from capsbench.attacks.base import ATTACKS, Attack


@ATTACKS.register("noise")
class SignNoise(Attack):
    """Random-sign noise of the attack's size, x + eps * sign(uniform(-1, 1)), L-inf: the
    non-adversarial baseline every attack should beat (Carlini et al. 2019)."""

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        u = torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1
        return x + self.eps * u.sign()
