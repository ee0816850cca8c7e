"""The reconstructive attack (Qin et al., ICLR 2020): an adaptive attack on the class-conditional
reconstruction detector (DARCCC; Frosst, Sabour & Hinton 2018), which flags an input whose
reconstruction from its predicted capsule is far from it. The attack must fool the classifier
and keep that reconstruction error under the detector's threshold at once.

PGD (L-inf, signed steps, projected) on loss(x) - weight * max(0, err(x) - threshold), with err
the L2 distance between x and its reconstruction from the predicted capsule. The image kept per
example is the last iterate that was both misclassified and under the threshold (undetected),
else the last iterate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from capsbench.attacks.base import ATTACKS
from capsbench.attacks.pgd import PGD
from capsbench.models import BenchModel, ModelOutput
from capsbench.models.scoring import reconstruction_error


@ATTACKS.register("reconstructive")
class ReconstructiveAttack(PGD):
    """Reconstructive attack (Qin et al. 2020), L-inf: PGD that fools the classifier and keeps the
    reconstruction error under the detector's ``threshold``. Needs a model with a decoder."""

    default_loss = "ce"

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, loss: str | None = None, steps: int = 40,
                 step_size: float = 0.0, random_start: bool = False, threshold: float = math.inf,
                 weight: float = 10.0) -> None:  # fmt: skip
        if not model.reconstructs:
            raise ValueError(f"the reconstructive attack needs a model with a reconstruction; "
                             f"{type(model).__name__} has none")  # fmt: skip
        super().__init__(model, eps, dtype, batch_size, loss, steps, step_size, random_start)
        if weight < 0:
            raise ValueError(f"the reconstructive attack needs weight >= 0, got {weight}")
        self.threshold, self.weight = float(threshold), float(weight)
        self.last_err: Tensor | None = None

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        err = reconstruction_error(out, x)  # (B,)
        self.last_err = err.detach()
        over = F.relu(err - self.threshold) if math.isfinite(self.threshold) else torch.zeros_like(err)
        return self.loss(self.model, out, y, target) - self.weight * over

    def undetected(self, scores: Tensor, y: Tensor) -> Tensor:
        assert self.last_err is not None
        return (scores.argmax(dim=1) != y) & (self.last_err <= self.threshold)

    def perturb(self, x: Tensor, y: Tensor, generator: torch.Generator | None, target: Tensor | None) -> Tensor:
        adv = self.start(x, generator)
        found, hit = adv.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for i in range(self.steps + 1):
            _, grad, scores = self.loss_and_grad(adv, y, target)  # the last one scores the last iterate
            now = self.undetected(scores, y)
            found, hit = torch.where(now.view(-1, 1, 1, 1), adv, found), hit | now
            if i < self.steps:
                adv = self.step(adv, x, grad)
        return torch.where(hit.view(-1, 1, 1, 1), found, adv)
