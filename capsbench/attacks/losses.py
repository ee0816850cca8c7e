"""The losses an attack climbs, as data: each maps a forward pass to a per-example objective (B,)
to *increase*; untargeted it pushes away from the true class, targeted toward the target.

- ``margin``: CapsNet's training loss (Sabour et al. 2017, eq. 4) on its capsule lengths; only
  for models whose scores are capsule lengths. Flat (zero gradient) once a length passes m+ = 0.9
  or falls below m- = 0.1, which is why it masks gradients on confident images.
- ``ce``: cross-entropy on the model's attack scores (``BenchModel.attack_scores``: logits for a
  CNN, log(l / (1 - l)) of the lengths for CapsNet).
- ``dlr``: the Difference of Logits Ratio (Croce & Hein 2020) on the attack scores,
  -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3); targeted -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
  Scale-invariant, so it does not saturate on confident images.
- ``cw``: the Carlini-Wagner margin max_{i != y} z_i - z_y (> 0 once misclassified); targeted
  z_t - max_{i != t} z_i. Square's acceptance criterion.

Every loss is per example, so an example's gradient never depends on the rest of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from capsbench.core.registry import Registry
from capsbench.models import BenchModel, ModelOutput

LossFn = Callable[[BenchModel, ModelOutput, Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class AttackLoss:
    name: str
    fn: LossFn  # (model, out, y (B,), target (B,) or None) -> objective (B,) to increase
    needs: str = ""  # "lengths": only for models whose scores are capsule lengths
    about: str = ""

    def unavailable(self, model: BenchModel) -> str | None:
        """Why ``model`` cannot provide this loss, or None when it can."""
        if self.needs == "lengths" and model.score_kind != "lengths":
            return f"loss {self.name!r} needs capsule lengths; {type(model).__name__} outputs {model.score_kind}"
        return None

    def __call__(self, model: BenchModel, out: ModelOutput, y: Tensor, target: Tensor | None = None) -> Tensor:
        return self.fn(model, out, y, target).float()


LOSSES: Registry[AttackLoss] = Registry("attack loss")


def register(name: str, needs: str = "", about: str = "") -> Callable[[LossFn], LossFn]:
    def deco(fn: LossFn) -> LossFn:
        LOSSES.register(name, description=about)(AttackLoss(name, fn, needs, about))
        return fn

    return deco


def resolve_loss(name: str, model: BenchModel) -> AttackLoss:
    """The loss ``name`` (``own``: the model's training loss) for ``model``; a clear error when the
    name is unknown or the model cannot provide it."""
    loss = LOSSES.get(model.own_loss if name == "own" else name)
    why = loss.unavailable(model)
    if why:
        raise ValueError(why)
    return loss


def _others_max(z: Tensor, cls: Tensor) -> Tensor:
    """max_{i != cls} z_i (B,) for scores z (B, C)."""
    return z.masked_fill(F.one_hot(cls, z.shape[1]).bool(), float("-inf")).amax(dim=1)


def _pick(z: Tensor, cls: Tensor) -> Tensor:
    return z.gather(1, cls[:, None]).squeeze(1)


@register("margin", needs="lengths", about="CapsNet's margin loss on capsule lengths (its training loss)")
def _margin(model: BenchModel, out: ModelOutput, y: Tensor, target: Tensor | None) -> Tensor:
    lengths = out.scores.float()
    if target is None:
        return model.margin_loss(lengths, y)  # type: ignore[attr-defined]
    return -model.margin_loss(lengths, target)  # type: ignore[attr-defined]


@register("ce", about="cross-entropy on the attack scores (logits; log-odds of capsule lengths)")
def _ce(model: BenchModel, out: ModelOutput, y: Tensor, target: Tensor | None) -> Tensor:
    z = model.attack_scores(out)
    if target is None:
        return F.cross_entropy(z, y, reduction="none")
    return -F.cross_entropy(z, target, reduction="none")


@register("dlr", about="Difference of Logits Ratio (Croce & Hein 2020) on the attack scores; scale-invariant")
def _dlr(model: BenchModel, out: ModelOutput, y: Tensor, target: Tensor | None) -> Tensor:
    z = model.attack_scores(out)  # (B, C)
    top = z.sort(dim=1, descending=True).values  # (B, C): z_pi1 >= z_pi2 >= ...
    if target is None:
        return -(_pick(z, y) - _others_max(z, y)) / (top[:, 0] - top[:, 2] + 1e-12)
    return -(_pick(z, y) - _pick(z, target)) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)


@register("cw", about="Carlini-Wagner margin max_{i != y} z_i - z_y on the attack scores")
def _cw(model: BenchModel, out: ModelOutput, y: Tensor, target: Tensor | None) -> Tensor:
    z = model.attack_scores(out)
    if target is None:
        return _others_max(z, y) - _pick(z, y)
    return _pick(z, target) - _others_max(z, target)


__all__ = ["LOSSES", "AttackLoss", "resolve_loss"]
