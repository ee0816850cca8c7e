"""White-box L-inf attacks sharing one base (torchattacks-style, without its magic).

The base puts the model in eval mode and turns off parameter gradients (both restored
afterwards; an attack needs input gradients only), moves the inputs to the model's device,
splits them into batches, and clamps to [0, 1]. Every attack climbs a per-example loss from
``attacks.losses`` (``own`` = the model's training loss) summed over the batch, so an example's
gradient does not depend on the other examples in its batch. eps = 0 returns the input
unchanged, so accuracy at eps = 0 equals clean accuracy exactly.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from capsbench.attacks.losses import resolve_loss
from capsbench.core.device import autocast
from capsbench.core.registry import Registry
from capsbench.models import BenchModel, ModelOutput
from capsbench.models.base import eval_mode, fast_input_grads

ATTACKS: Registry[type[Attack]] = Registry("attack")


@contextlib.contextmanager
def attack_mode(model: BenchModel, fast: bool = False) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration, and with ``fast`` the model's CPU fast
    paths for input gradients too (``models.base.fast_input_grads``); all restored afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # no weight gradients: they cost as much as the input gradient
    try:
        with eval_mode(model), fast_input_grads(model, fast):
            yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def model_device(model: BenchModel) -> torch.device:
    return next(model.parameters()).device


def project(adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """``adv`` clipped to the L-inf ball of radius ``eps`` around ``x`` and to [0, 1]."""
    return torch.min(torch.max(adv, x - eps), x + eps).clamp_(0, 1)


class Attack:
    """Base: subclasses implement ``perturb`` on one batch; ``__call__`` does everything else.

    ``dtype``: autocast dtype for the forward pass (None = fp32); the input and its gradient
    stay fp32. ``batch_size``: examples per forward/backward pass (None = all at once).
    ``loss``: a name in ``attacks.losses.LOSSES`` or ``own``; a model that cannot provide it is
    refused here (ValueError), before any work.
    ``fast_grads``: input gradients may take the model's CPU fast paths (CapsNet: about 2x
    faster, rounding ~1e-6 of the largest entry; ``models.base.fast_input_grads``). True for
    iterative and score-based attacks, which that rounding does not weaken; single-step attacks
    keep the plain paths.
    """

    targeted = False  # True: needs ``target`` classes and succeeds when the prediction hits them
    default_loss = "own"
    fast_grads = True

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, loss: str | None = None) -> None:  # fmt: skip
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.model, self.eps, self.dtype, self.batch_size = model, float(eps), dtype, batch_size
        self.loss = resolve_loss(loss or self.default_loss, model)
        # Images whose first input gradient is exactly zero (a gradient-masking diagnostic):
        # a 0-dim device tensor after a call with eps > 0, read by the caller when it wants.
        self.zero_grads: Tensor = torch.zeros((), dtype=torch.long)
        self._first_grad = False
        self.on_step: Callable[[], None] | None = None  # called after every gradient or query (progress)

    def forward(self, x: Tensor) -> ModelOutput:
        with autocast(x.device, self.dtype):
            return self.model(x)

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Per-example objective (B,) the attack increases (subclasses may add terms)."""
        return self.loss(self.model, out, y, target)

    def loss_and_grad(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(objective (B,), its gradient (B, 1, S, S) with respect to ``x``, attack scores (B, C)),
        all detached; the objective is summed over the batch for the gradient (per-example)."""
        x = x.detach().float().requires_grad_(True)
        out = self.forward(x)
        obj = self.objective(out, x, y, target)
        (grad,) = torch.autograd.grad(obj.sum(), x)
        if self._first_grad:
            self.zero_grads = self.zero_grads + (grad.flatten(1).abs().amax(dim=1) == 0).sum()
            self._first_grad = False
        self.stepped()
        return obj.detach(), grad, self.model.attack_scores(out).detach()

    def stepped(self) -> None:
        """One gradient or query on a batch done: tell ``on_step`` (a progress bar), if any."""
        if self.on_step is not None:
            self.on_step()

    def loss_grad(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        """Gradient (B, 1, S, S) of the summed per-example objective with respect to ``x``."""
        return self.loss_and_grad(x, y, target)[1]

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        raise NotImplementedError

    def keep_misclassified(self, x: Tensor, y: Tensor, adv: Tensor) -> Tensor:
        """``adv`` with the images already misclassified at ``x`` put back to ``x`` (as the
        AutoAttack reference does): a search that returns its best iterate must never turn a
        wrong image into a right one."""
        with torch.no_grad():
            wrong = self.model.attack_scores(self.forward(x)).argmax(dim=1) != y
        return torch.where(wrong.view(-1, 1, 1, 1), x, adv)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None,
                 target: Tensor | None = None) -> Tensor:  # fmt: skip
        """Adversarial images (B, 1, S, S) in [0, 1], within eps of ``x`` in L-inf. ``y``: the true
        classes; ``target``: the target classes of a targeted attack."""
        if self.targeted and target is None:
            raise ValueError(f"{type(self).__name__} is targeted: pass target classes")
        if self.eps == 0:
            return x
        return self.batched(lambda xb, yb, tb: self.perturb(xb, yb, generator, tb).detach().clamp_(0, 1), x, y, target)

    def batched(self, fn: Callable[[Tensor, Tensor, Tensor | None], Tensor], x: Tensor, y: Tensor,
                target: Tensor | None = None) -> Tensor:  # fmt: skip
        """``fn(x, y, target)`` over batches on the model's device, in attack mode."""
        device = model_device(self.model)
        x, y = x.to(device), y.to(device)
        target = target.to(device) if target is not None else None
        self.zero_grads = torch.zeros((), dtype=torch.long, device=device)
        bs = self.batch_size or max(len(x), 1)
        out = []
        with attack_mode(self.model, self.fast_grads), torch.enable_grad():
            for i in range(0, len(x), bs):
                self._first_grad = True
                tb = target[i : i + bs] if target is not None else None
                out.append(fn(x[i : i + bs].float(), y[i : i + bs], tb))
        return torch.cat(out) if out else x


class SingleStep(Attack):
    """One signed-gradient step: x + eps * sign(grad). The sign does not depend on eps, so an eps
    sweep needs one gradient: :meth:`direction`, then :meth:`from_direction`. Its gradient takes
    the plain paths: a near-zero pixel gradient whose sign the fast paths' rounding flips would
    move that pixel by eps the other way."""

    fast_grads = False

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        return x + self.eps * self.loss_grad(x, y, target).sign()

    def direction(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        """d (B, 1, S, S) in {-1, 0, 1}; sets ``zero_grads`` like a call does."""
        return self.batched(lambda xb, yb, tb: self.loss_grad(xb, yb, tb).sign().detach(), x, y, target)

    def from_direction(self, x: Tensor, d: Tensor) -> Tensor:
        """Exactly what a call at this eps returns, given ``direction``'s d for the same x."""
        if self.eps == 0:
            return x
        return (x.to(d.device).float() + self.eps * d).clamp_(0, 1)
