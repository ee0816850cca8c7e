"""White-box L-inf attacks sharing one base (torchattacks-style, without its magic).

The base puts the model in eval mode and turns off parameter gradients (both restored
afterwards; an attack needs input gradients only), moves the inputs to the model's device,
splits them into batches, and clamps to [0, 1]. Every attack climbs the model's own
per-example ``attack_loss`` summed over the batch, so an example's gradient does not depend on
the other examples in its batch. eps = 0 returns the input unchanged, so accuracy at eps = 0
equals clean accuracy exactly.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from capsbench.core.device import autocast
from capsbench.core.registry import Registry
from capsbench.models import BenchModel
from capsbench.models.base import eval_mode

ATTACKS: Registry[type["Attack"]] = Registry("attack")


@contextlib.contextmanager
def attack_mode(model: BenchModel) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; both restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # no weight gradients: they cost as much as the input gradient
    try:
        with eval_mode(model):
            yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def model_device(model: BenchModel) -> torch.device:
    return next(model.parameters()).device


class Attack:
    """Base: subclasses implement ``perturb`` on one batch; ``__call__`` does everything else.

    ``dtype``: autocast dtype for the forward pass (None = fp32); the input and its gradient
    stay fp32. ``batch_size``: examples per forward/backward pass (None = all at once).
    """

    targeted = False

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None) -> None:  # fmt: skip
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.model, self.eps, self.dtype, self.batch_size = model, float(eps), dtype, batch_size
        # Images whose first input gradient is exactly zero (a gradient-masking diagnostic):
        # a 0-dim device tensor after a call with eps > 0, read by the caller when it wants.
        self.zero_grads: Tensor = torch.zeros((), dtype=torch.long)
        self._first_grad = False

    def loss_grad(self, x: Tensor, labels: Tensor) -> Tensor:
        """Gradient (B, 1, S, S) of the summed per-example attack loss with respect to ``x``."""
        x = x.detach().float().requires_grad_(True)
        with autocast(x.device, self.dtype):
            out = self.model(x)
        loss = self.model.attack_loss(out, labels).float().sum()  # sum: per-example gradients
        (grad,) = torch.autograd.grad(loss, x)
        if self._first_grad:
            self.zero_grads = self.zero_grads + (grad.flatten(1).abs().amax(dim=1) == 0).sum()
            self._first_grad = False
        return grad

    def perturb(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Adversarial images (B, 1, S, S) in [0, 1], within eps of ``x`` in L-inf. ``labels``:
        the true classes, or the target classes for a targeted attack."""
        if self.eps == 0:
            return x
        return self.batched(lambda xb, lb: self.perturb(xb, lb, generator).detach().clamp_(0, 1), x, labels)

    def batched(self, fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, labels: Tensor) -> Tensor:
        """``fn`` over batches of (x, labels) on the model's device, in attack mode."""
        device = model_device(self.model)
        x, labels = x.to(device), labels.to(device)
        self.zero_grads = torch.zeros((), dtype=torch.long, device=device)
        bs = self.batch_size or len(x)
        out = []
        with attack_mode(self.model), torch.enable_grad():
            for i in range(0, len(x), bs):
                self._first_grad = True
                out.append(fn(x[i : i + bs].float(), labels[i : i + bs]))
        return torch.cat(out) if out else x


class SingleStep(Attack):
    """One signed-gradient step: x + eps * d with d = step_sign * sign(grad). d does not depend on
    eps, so an eps sweep needs one gradient: :meth:`direction`, then :meth:`from_direction`."""

    step_sign = 1.0

    def perturb(self, x: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        return x + self.eps * (self.step_sign * self.loss_grad(x, labels).sign())

    def direction(self, x: Tensor, labels: Tensor) -> Tensor:
        """d (B, 1, S, S) in {-1, 0, 1}; sets ``zero_grads`` like a call does."""
        return self.batched(lambda xb, lb: (self.step_sign * self.loss_grad(xb, lb).sign()).detach(), x, labels)

    def from_direction(self, x: Tensor, d: Tensor) -> Tensor:
        """Exactly what a call at this eps returns, given ``direction``'s d for the same x."""
        if self.eps == 0:
            return x
        return (x.to(d.device).float() + self.eps * d).clamp_(0, 1)
