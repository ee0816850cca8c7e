"""The vote attack (Gu, Wu & Tresp, ICLR 2021, arXiv 2102.10055), L-inf: PGD whose gradients come
from a surrogate of the capsule model that replaces routing by the uniform average of the votes
(``CapsuleModel.uniform_votes``), so the attack does not have to differentiate through the
routing iterations; the images it returns are then scored on the real model by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from capsbench.attacks.base import ATTACKS
from capsbench.attacks.pgd import PGD
from capsbench.models import BenchModel, ModelOutput
from capsbench.models.capsule import has_votes


@ATTACKS.register("vote")
class VoteAttack(PGD):
    """PGD (BIM by default) on the uniform-vote surrogate of a capsule model (Gu et al. 2021),
    climbing cross-entropy on the surrogate's log(l / (1 - l)) capsule scores by default. Needs a
    model with votes to average (``models.capsule.has_votes``)."""

    default_loss = "ce"

    def __init__(self, model: BenchModel, eps: float, dtype: torch.dtype | None = None,
                 batch_size: int | None = None, loss: str | None = None, steps: int = 40,
                 step_size: float = 0.0, random_start: bool = False) -> None:  # fmt: skip
        if not has_votes(model):
            raise ValueError(f"the vote attack needs a capsule model whose votes can be averaged; "
                             f"{type(model).__name__} has none")  # fmt: skip
        super().__init__(model, eps, dtype, batch_size, loss, steps, step_size, random_start)

    def forward(self, x: Tensor) -> ModelOutput:
        with self.model.uniform_votes():  # type: ignore[attr-defined]
            return super().forward(x)
