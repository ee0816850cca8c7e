"""The one divergence check of every training loop, run where the loop reads its loss anyway."""

from __future__ import annotations

import math

from capsbench.core.errors import CapsbenchError


def check_loss(loss: float, label: str, step: int, lr_key: str = "train.lr", amp_key: str = "train.amp") -> None:
    """Raise a one-line CapsbenchError when ``loss`` (read at ``step``) is NaN or infinite, naming
    the run and the ``--set`` keys that fix it: a lower learning rate, or bf16 off."""
    if not math.isfinite(loss):
        raise CapsbenchError(
            f"{label or 'training'} diverged: loss is {loss} at step {step}; lower the learning rate "
            f"(--set {lr_key}=...) or train in fp32 (--set {amp_key}=fp32)"
        )
