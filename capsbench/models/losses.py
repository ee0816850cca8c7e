"""The margin loss of capsule lengths (Sabour et al. 2017, eq. 4), one definition for every target:
one-hot for MNIST classification (``CapsNet.margin_loss``), two-hot for MultiMNIST."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def margin_loss(lengths: Tensor, target: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> Tensor:  # fmt: skip
    """Per-example margin loss (B,) of capsule lengths (B, C) for a multi-hot target (B, C), T_k = 1
    for every class present: T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2,
    summed over classes."""
    present = target * F.relu(m_plus - lengths) ** 2
    absent = lambda_ * (1 - target) * F.relu(lengths - m_minus) ** 2
    return (present + absent).sum(dim=1)
