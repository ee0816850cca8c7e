"""One-pass self-attention routing (Mazzia, Salvetti & Chiaberge 2021, Efficient-CapsNet), on
CapsNet's votes. Each vote's agreement with the sum of all votes for the same parent,
c_ij = softmax_j (u_hat_ij . sum_k u_hat_kj) / sqrt(D), computed as that dot product (never
the N x N matrix of pairwise agreements, whose row sums it is), plus a learned prior b_ij
(zeros at first): s_j = sum_i u_hat_ij (c_ij + b_ij), v = squash(s). CapsNet's squash: the head
is the routing, not Efficient-CapsNet's squash. Returned: c, the softmax part, and the logits.

Parameters: the prior, N x C = 1152 x 10 = 11,520. The paper CapsNet at 28x28 (N = 1152, C = 10,
D = 16, P = 8): W = N C D P = 1,474,560, plus 6,741,008 outside the head, plus 11,520:
8,227,088 parameters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from capsbench.models.heads.base import HEADS, HeadSpec, Routed, RoutingHead
from capsbench.models.routing import squash


@HEADS.register("attention", description="one-pass self-attention routing (Mazzia et al. 2021) + learned prior")
class AttentionHead(RoutingHead):
    """Couplings from each vote's agreement with the sum of the votes, one pass."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__(spec)
        self.prior = nn.Parameter(torch.zeros(spec.num_primary, spec.num_classes))  # b (N, C)

    @classmethod
    def own_params(cls, spec: HeadSpec) -> int:
        return spec.num_primary * spec.num_classes

    def forward(self, u_hat: Tensor, u: Tensor, parent_major: bool = False) -> Routed:
        total = u_hat.sum(1, keepdim=True)  # (B, 1, C, D): sum_k u_hat_kj
        logits = (u_hat * total).sum(-1) / math.sqrt(u_hat.shape[-1])  # (B, N, C)
        c = torch.softmax(logits, dim=2)  # over parents
        s = ((c + self.prior).unsqueeze(-1) * u_hat).sum(1)  # (B, C, D)
        return Routed(squash(s), c, logits)
