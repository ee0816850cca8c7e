"""FGSM and targeted FGSM: one signed-gradient step (L-inf)."""

from __future__ import annotations

from capsbench.attacks.base import ATTACKS, SingleStep


@ATTACKS.register("fgsm")
class FGSM(SingleStep):
    """Fast Gradient Sign Method (Goodfellow et al. 2015), untargeted, L-inf:
    x + eps * sign(grad_x loss(x, y)), one step, no random start."""


@ATTACKS.register("fgsm-targeted")
class TargetedFGSM(SingleStep):
    """Targeted FGSM (Kurakin et al. 2017), L-inf: one step up the loss's targeted form, i.e. down
    the target class's loss for ``own``/``margin``/``ce``: x - eps * sign(grad_x loss(x, target))."""

    targeted = True
