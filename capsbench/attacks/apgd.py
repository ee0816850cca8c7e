"""APGD and APGD-T (Croce & Hein, ICML 2020): PGD with a step size that adapts per example, no
step-size tuning. L-inf, following the reference implementation (fra31/auto-attack):

- start at a random point of the eps-ball, step size 2 eps;
- each step: z = P(x_k + eta sign(grad)), x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})),
  momentum a = 0.75 (a = 1 on the first step);
- checkpoints after 22% of the steps, then ever shorter stretches (by 3% of the steps, at least
  6%): an example whose loss rose on at most rho = 75% of the stretch's steps, or whose best loss
  did not improve since the last checkpoint without a halving there, halves its step size and
  restarts from its best point;
- an example counts as fooled once an iterate is misclassified (the last such iterate is kept,
  as in the reference); restarts re-run from new random points and keep the first run's success;
  images already misclassified at x are returned unchanged.

Everything is per example and on the device: no host syncs inside the iterations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from capsbench.attacks.base import ATTACKS, Attack, project
from capsbench.models import BenchModel


def checkpoint_lengths(steps: int) -> tuple[int, int, int]:
    """(first stretch, decrement, minimum stretch) in steps: 22%, 3% and 6% of ``steps``."""
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


def _rows(mask: Tensor) -> Tensor:
    return mask.view(-1, 1, 1, 1)


@ATTACKS.register("apgd")
class APGD(Attack):
    """Auto-PGD, untargeted (APGD-CE with ``loss="ce"``, APGD-DLR with ``loss="dlr"``).
    ``steps`` gradient steps per run (the reference: 100), ``restarts`` runs from random starts."""

    default_loss = "ce"

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, loss: str | None = None, steps: int = 100,
                 restarts: int = 1, rho: float = 0.75, momentum: float = 0.75) -> None:  # fmt: skip
        super().__init__(model, eps, dtype, batch_size, loss)
        if steps < 1 or restarts < 1:
            raise ValueError(f"APGD needs steps >= 1 and restarts >= 1, got {steps}, {restarts}")
        self.steps, self.restarts, self.rho, self.momentum = steps, restarts, rho, momentum

    def fooled(self, scores: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Success per example (B,) bool: misclassified (APGD-T too: its target only guides)."""
        return scores.argmax(dim=1) != y

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        best, done = self.run(x, y, generator, target)
        for _ in range(self.restarts - 1):
            adv, ok = self.run(x, y, generator, target)
            take = ok & ~done
            best, done = torch.where(_rows(take), adv, best), done | ok
        return self.keep_misclassified(x, y, best)

    def random_start(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        t = torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1
        scale = t.flatten(1).abs().amax(dim=1).clamp_min(1e-12)  # the farthest pixel on the ball's surface
        return (x + self.eps * t / _rows(scale)).clamp(0, 1)

    def run(self, x: Tensor, y: Tensor, generator: torch.Generator | None,
            target: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
        """One run from a random start: (images (B, 1, S, S), fooled (B,) bool). The images are
        the last misclassified iterate where one was found, else the best-loss iterate. The
        first stretch's rises are counted from the starting loss (the reference compares its first
        step with a row of zeros)."""
        eps = self.eps
        adv = self.random_start(x, generator)
        loss, grad, scores = self.loss_and_grad(adv, y, target)
        done = self.fooled(scores, y, target)
        found = adv  # (B, 1, S, S) the misclassified iterate; every update below makes a new tensor
        x_best, loss_best, grad_best = adv, loss, grad
        step = torch.full((len(x),), 2.0 * eps, device=x.device)  # (B,) per-example step size
        prev = adv
        history = [loss]  # per-step losses (B,), the start first
        stretch, decrement, shortest = checkpoint_lengths(self.steps)
        since, last_check = 0, 0
        halved_last = torch.ones_like(done)  # as the reference: no "no improvement" halving at the first checkpoint
        best_at_check = loss_best
        for i in range(self.steps):
            a = self.momentum if i > 0 else 1.0
            z = project(adv + _rows(step) * grad.sign(), x, eps)
            prev, adv = adv, project(adv + a * (z - adv) + (1 - a) * (adv - prev), x, eps)
            loss, grad, scores = self.loss_and_grad(adv, y, target)
            now = self.fooled(scores, y, target)
            found = torch.where(_rows(now), adv, found)
            done = done | now
            history.append(loss)
            better = loss > loss_best
            x_best = torch.where(_rows(better), adv, x_best)
            grad_best = torch.where(_rows(better), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)
            since += 1
            if since == stretch:  # a checkpoint
                window = torch.stack(history[last_check:])  # (stretch + 1, B)
                rises = (window[1:] > window[:-1]).sum(dim=0)  # (B,)
                halve = (rises <= self.rho * stretch) | (~halved_last & (best_at_check >= loss_best))
                step = torch.where(halve, step / 2, step)
                adv = torch.where(_rows(halve), x_best, adv)
                grad = torch.where(_rows(halve), grad_best, grad)
                halved_last, best_at_check = halve, loss_best
                last_check, since = len(history) - 1, 0
                stretch = max(stretch - decrement, shortest)
        return torch.where(_rows(done), found, x_best), done


@ATTACKS.register("apgd-t")
class TargetedAPGD(APGD):
    """APGD-T: APGD on the targeted DLR loss toward each of the ``targets`` classes with the
    highest scores at the clean input after the top one (the reference's standard: 9, one run
    each); success is still misclassification. Not a targeted attack in the success sense, so it
    needs no ``target``."""

    default_loss = "dlr"

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, loss: str | None = None, steps: int = 100,
                 restarts: int = 1, targets: int = 9, rho: float = 0.75, momentum: float = 0.75) -> None:  # fmt: skip
        super().__init__(model, eps, dtype, batch_size, loss, steps, restarts, rho, momentum)
        if not 1 <= targets < model.num_classes:
            raise ValueError(f"APGD-T needs 1 <= targets < {model.num_classes} classes, got {targets}")
        self.targets = targets

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        with torch.no_grad():
            order = self.model.attack_scores(self.forward(x)).argsort(dim=1, descending=True)  # (B, C)
        best, done = None, torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for k in range(self.targets):
            for _ in range(self.restarts):
                adv, ok = self.run(x, y, generator, order[:, k + 1])
                best = adv if best is None else torch.where(_rows(ok & ~done), adv, best)
                done = done | ok
        return self.keep_misclassified(x, y, best)
