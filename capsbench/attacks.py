"""White-box L-inf attacks sharing one base (torchattacks-style, without its magic).

The base puts the model in eval mode (restored afterwards), turns off parameter gradients
(restored; the attack needs input gradients only), clamps to [0, 1], and always climbs the
model's own per-example ``attack_loss`` summed over the batch, so an example's gradient does
not depend on the other examples in its batch. eps = 0 returns the input unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from capsbench.device import autocast
from capsbench.models import BenchModel
from capsbench.registry import Registry

ATTACKS: Registry[type["Attack"]] = Registry("attack")


@contextlib.contextmanager
def attack_mode(model: BenchModel) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


class Attack:
    """Base: subclasses implement ``perturb`` on a batch; ``__call__`` handles modes and eps = 0."""

    targeted = False

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None) -> None:
        self.model, self.eps, self.dtype = model, float(eps), dtype
        self.zero_grads: Tensor | int = 0  # images whose first input gradient was exactly zero

    def loss_grad(self, x: Tensor, labels: Tensor) -> Tensor:
        """Gradient of the summed per-example attack loss with respect to the input."""
        x = x.detach().requires_grad_(True)
        with autocast(x.device, self.dtype):
            out = self.model(x)
        loss = self.model.attack_loss(out, labels).float().sum()
        (grad,) = torch.autograd.grad(loss, x)
        if isinstance(self.zero_grads, int):  # first gradient only: a gradient-masking diagnostic
            self.zero_grads = (grad.flatten(1).abs().amax(dim=1) == 0).sum()
        return grad

    def perturb(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial (B, 1, S, S) images in [0, 1] within eps of ``x`` in L-inf. ``labels``:
        the true classes, or the targets for a targeted attack."""
        if self.eps == 0:
            return x
        with attack_mode(self.model), torch.enable_grad():
            adv = self.perturb(x, labels, generator)
        return adv.detach().clamp_(0, 1)


@ATTACKS.register("fgsm")
class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015), untargeted, L-inf: one step of
    eps * sign(grad), no random start."""

    def perturb(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.eps * self.loss_grad(x, labels).sign()


@ATTACKS.register("fgsm-targeted")
class TargetedFGSM(Attack):
    """Targeted FGSM (Kurakin et al. 2017), L-inf: one step *down* the target class's loss."""

    targeted = True

    def perturb(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        return x - self.eps * self.loss_grad(x, labels).sign()


@ATTACKS.register("pgd")
class PGD(Attack):
    """Iterative L-inf attack: BIM (Kurakin et al. 2017) by default, i.e. PGD (Madry et al.
    2018) without a random start; ``random_start=True`` gives Madry's PGD. Each step moves
    ``step_size`` along the gradient sign, then projects onto the eps-ball and [0, 1]."""

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None, steps: int = 10,
                 step_size: float = 0.0, random_start: bool = False) -> None:  # fmt: skip
        super().__init__(model, eps, dtype)
        self.steps = steps
        self.step_size = step_size if step_size > 0 else 2.5 * self.eps / steps  # Madry's rule
        self.random_start = random_start

    def perturb(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        adv = x
        if self.random_start:
            noise = torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1
            adv = (x + self.eps * noise).clamp(0, 1)
        for _ in range(self.steps):
            adv = adv + self.step_size * self.loss_grad(adv, labels).sign()
            adv = torch.min(torch.max(adv, x - self.eps), x + self.eps).clamp(0, 1)
        return adv


@ATTACKS.register("noise")
class SignNoise(Attack):
    """Uniform random-sign noise of the attack's size (x + eps * s, s in {-1, +1}): the
    non-adversarial baseline every attack should beat (Carlini et al. 2019)."""

    def perturb(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        signs = torch.randint(0, 2, x.shape, device=x.device, generator=generator).to(x.dtype) * 2 - 1
        return x + self.eps * signs
