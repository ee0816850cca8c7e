"""The one small interface every registered model implements.

A suite never special-cases a model: it calls ``model(x, y)`` to get a :class:`ModelOutput`,
``model.objective(out, x, y)`` to train and ``model.attack_loss(out, y)`` to attack.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple

from torch import Tensor, nn


class ModelOutput(NamedTuple):
    """What a forward pass returns. Only ``scores`` is required of every model."""

    scores: Tensor  # (B, C) class scores: capsule lengths or logits; argmax = prediction
    capsules: Tensor | None = None  # (B, C, D) class capsules (CapsNet)
    reconstruction: Tensor | None = None  # (B, H*W) decoder output in [0, 1] (CapsNet)
    coupling: Tensor | None = None  # (B, N, C) final coupling coefficients (CapsNet)
    routing_logits: Tensor | None = None  # (B, N, C) final routing logits b (CapsNet)


class BenchModel(nn.Module):
    """Base class: inputs are images in [0, 1] shaped (B, 1, S, S) with S = ``input_size``."""

    input_size: int
    num_classes: int
    loss_name: str  # what objective() and attack_loss() compute, for reports
    own_loss: str = "ce"  # the attack-loss name (capsbench.attacks.losses) of the training loss
    score_kind = "logits"  # what ``ModelOutput.scores`` are: "logits", or "lengths" (capsule lengths)
    score_name = "logits"  # what ``attack_scores`` returns, for reports
    # May the model's CPU fast paths run when the input needs a gradient? Off by default (their
    # rounding differs from the plain paths'); ``fast_input_grads`` turns it on for a block.
    allow_fast_input_grads = False

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        raise NotImplementedError

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor) -> Tensor:
        """Scalar training loss (batch mean) for this model's own training protocol."""
        raise NotImplementedError

    def attack_loss(self, out: ModelOutput, y: Tensor) -> Tensor:
        """Per-example loss (B,) that white-box attacks increase: the model's own class loss."""
        raise NotImplementedError

    def attack_scores(self, out: ModelOutput) -> Tensor:
        """Class scores (B, C) in fp32 for score-based attack losses (ce, dlr, cw): real-valued,
        logit-like, with the same argmax as ``out.scores``."""
        return out.scores.float()

    @property
    def reconstructs(self) -> bool:
        """Does ``forward`` return a class-conditional reconstruction (the DARCCC detector's input)?"""
        return False

    def nominal(self) -> BenchModel:
        """The model as its paper computes it, for counting MACs (itself unless a faster path
        computes the same function with fewer multiply-adds)."""
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def predict(out: ModelOutput) -> Tensor:
    """Predicted class per example, (B,) int64."""
    return out.scores.argmax(dim=1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, the previous mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def fast_input_grads(model: nn.Module, on: bool = True) -> Iterator[None]:
    """For the duration, let ``model``'s CPU fast paths (CapsNet: spectral PrimaryCaps,
    parent-major routing) compute input gradients too when ``on``; the previous setting restored
    afterwards. For iterative attacks, which the fast paths' rounding (~1e-6 of the largest
    gradient entry) does not weaken; single-step attacks, which move every pixel by eps along
    its gradient's sign, keep the plain paths."""
    before = getattr(model, "allow_fast_input_grads", False)
    model.allow_fast_input_grads = on
    try:
        yield
    finally:
        model.allow_fast_input_grads = before
