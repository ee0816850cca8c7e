"""The capsule interface: what parts and attacks may rely on in a model whose class scores are
capsule lengths, so that no part names a concrete model class.

A ``CapsuleModel`` returns class capsules (B, C, D) whose lengths are its scores, trains with the
margin loss on those lengths (plus an optional reconstruction term), and may have a
class-conditional decoder and routing (coupling coefficients in ``ModelOutput.coupling``).
CapsNet (any routing head) and Efficient-CapsNet implement it; so may a user's model.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsbench.models.base import BenchModel, ModelOutput
from capsbench.models.losses import margin_loss

# What a capsule model must provide beyond BenchModel, checked when a user's model is loaded.
CAPSULE_ATTRIBUTES = ("class_dim", "m_plus", "m_minus", "lambda_", "recon_weight", "decoder")


class CapsuleModel(BenchModel):
    """Class capsules with lengths as scores, the margin loss, an optional decoder.

    Subclasses set ``class_dim``, the margin-loss constants, ``recon_weight`` and ``decoder``
    (None for none), and implement ``forward`` returning ``ModelOutput(lengths, capsules,
    reconstruction, coupling, routing_logits)``; the last three may be None.
    """

    loss_name = "margin loss (attacks: margin loss on capsule lengths)"
    own_loss = "margin"
    score_kind = "lengths"
    score_name = "log(l / (1 - l)) of the capsule lengths l (= 2 log of the pre-squash norm)"
    class_dim: int = 16
    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_: float = 0.5
    recon_weight: float = 0.0005
    # ``decoder`` (an nn.Module or None) is set by each subclass; not a class attribute, which
    # would shadow the submodule nn.Module registers.
    # (types, grid): the primary capsules laid out as types x grid x grid, for coupling maps;
    # None when the children have no such layout.
    primary_layout: tuple[int, int] | None = None

    @property
    def routes(self) -> bool:
        """Does ``forward`` return coupling coefficients (B, N, C) that sum to 1 over parents?"""
        return False

    @property
    def reconstructs(self) -> bool:
        return getattr(self, "decoder", None) is not None

    def margin_loss(self, lengths: Tensor, y: Tensor) -> Tensor:
        """Per-example margin loss (B,), summed over classes (Sabour et al. 2017, eq. 4)."""
        t = F.one_hot(y, self.num_classes).to(lengths.dtype)  # (B, C)
        return margin_loss(lengths, t, self.m_plus, self.m_minus, self.lambda_)

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor) -> Tensor:
        """Margin loss plus ``recon_weight`` x the per-image sum of squared reconstruction errors."""
        loss = self.margin_loss(out.scores.float(), y).mean()
        if out.reconstruction is not None:
            sse = ((out.reconstruction.float() - x.flatten(1).float()) ** 2).sum(dim=1)
            loss = loss + self.recon_weight * sse.mean()
        return loss

    def attack_loss(self, out: ModelOutput, y: Tensor) -> Tensor:
        return self.margin_loss(out.scores.float(), y)

    def attack_scores(self, out: ModelOutput) -> Tensor:
        """log(l / (1 - l)) of the lengths l (B, C): lengths are not logits (they live in [0, 1) and
        a softmax over them is nearly flat). For the squash l = n^2 / (1 + n^2) of the pre-squash
        norm n this is 2 log n: monotone in l (same prediction), unbounded like logits, and
        steepest where the margin loss is flat (l above m+ or below m-)."""
        lengths = out.scores.float().clamp(1e-12, 1 - 1e-7)  # finite at l = 0 and l = 1 in fp32
        return torch.log(lengths) - torch.log1p(-lengths)

    def decode(self, capsules: Tensor, target: Tensor) -> Tensor:
        """Decoder image (B, C_in*S*S) from class capsules (B, C, D), every capsule but ``target``'s
        (B,) masked to zero."""
        if not self.reconstructs:
            raise ValueError(f"{type(self).__name__} has no decoder; nothing to decode")
        mask = F.one_hot(target, self.num_classes).to(capsules.dtype)  # (B, C)
        return self.decoder((capsules * mask.unsqueeze(-1)).flatten(1))

    @contextlib.contextmanager
    def uniform_votes(self) -> Iterator[None]:
        """For the duration, class capsules from the uniform average of the votes instead of the
        model's routing (the vote attack's surrogate, Gu et al. 2021). Models without votes to
        average refuse."""
        raise NotImplementedError(f"{type(self).__name__} has no votes to average (no vote attack)")
        yield  # pragma: no cover


def is_capsule_model(model: nn.Module) -> bool:
    return isinstance(model, CapsuleModel)


def has_votes(model: nn.Module) -> bool:
    """Does ``model`` implement ``uniform_votes`` (a surrogate for the vote attack)?"""
    return isinstance(model, CapsuleModel) and type(model).uniform_votes is not CapsuleModel.uniform_votes
