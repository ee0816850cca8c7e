"""Uniform couplings, the no-agreement control (Paik, Kwak & Kim 2019, arXiv 1907.13327): every
child sends its vote to every parent with weight 1/C. Also the vote attack's surrogate (Gu, Wu &
Tresp, ICLR 2021), ``CapsNet.uniform_votes``.

Parameters: none of its own. The paper CapsNet at 28x28 (N = 1152, C = 10, D = 16, P = 8):
W = N C D P = 1,474,560 plus 6,741,008 outside the head = 8,215,568 (as dynamic routing).
"""

from __future__ import annotations

from torch import Tensor

from capsbench.models.heads.base import HEADS, Routed, RoutingHead
from capsbench.models.routing import squash


def uniform_routing(u_hat: Tensor) -> Tensor:
    """v = squash(sum_n u_hat / C) (B, C, D) for votes u_hat (B, N, C, D): dynamic routing's
    first iteration, where the couplings are softmax(0) = 1/C."""
    return squash(u_hat.sum(1) / u_hat.shape[2])


@HEADS.register("uniform", description="couplings fixed at 1/C, no agreement (Paik et al. 2019)")
class UniformHead(RoutingHead):
    """v = squash(sum_n u_hat / C); the constant couplings 1/C are returned (they sum to 1)."""

    def forward(self, u_hat: Tensor, u: Tensor, parent_major: bool = False) -> Routed:
        B, N, C, _ = u_hat.shape
        return Routed(uniform_routing(u_hat), u_hat.new_full((B, N, C), 1.0 / C))
