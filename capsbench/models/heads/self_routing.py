"""Self-routing (Hahn, Pyeon & Kim, NeurIPS 2019, official code coder3000/SR-CapsNet): each child
routes by itself, no agreement and no iteration. Its routing logits are a learned linear map of its
own pose, b_ij = W_i[j] . u_i + bias_ij, c_ij = softmax_j b_ij; the parents average the votes
weighted by coupling times child activation a_i = |u_i|:
a_j = sum_i c_ij a_i / sum_i a_i,  pose_j = sum_i c_ij a_i u_hat_ij / sum_i c_ij a_i,
v_j = a_j pose_j / |pose_j| (so |v_j| = a_j; the a_j sum to 1 over the parents).

As in the official code the routing weights start at zero (uniform couplings at first). The
children's activations are their lengths here (CapsNet's primary capsules have no separate
activation, which SR-CapsNet computes by its own convolution).

Parameters: routing weights N x C x P and biases N x C: N C (P + 1) = 1152 x 10 x 9 = 103,680.
The paper CapsNet at 28x28 (N = 1152, C = 10, D = 16, P = 8): W = N C D P = 1,474,560, plus
6,741,008 outside the head, plus 103,680: 8,319,248 parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capsbench.models.heads.base import HEADS, HeadSpec, Routed, RoutingHead, length, unit

MASS_EPS = 1e-8  # in denominators of sums of activations


@HEADS.register("self", description="self-routing (Hahn et al. 2019): each child's own learned softmax")
class SelfRoutingHead(RoutingHead):
    """Couplings from each child's pose by its own linear map (zeros at first), no iteration."""

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__(spec)
        N, C, P = spec.num_primary, spec.num_classes, spec.child_dim
        self.weight = nn.Parameter(torch.zeros(N, C, P))  # zero: uniform couplings at initialisation
        self.bias = nn.Parameter(torch.zeros(N, C))

    @classmethod
    def own_params(cls, spec: HeadSpec) -> int:
        return spec.num_primary * spec.num_classes * (spec.child_dim + 1)

    def forward(self, u_hat: Tensor, u: Tensor, parent_major: bool = False) -> Routed:
        u = u.to(u_hat.dtype)  # (B, N, P), fp32 like the votes (bf16 under autocast otherwise)
        b = (u.unsqueeze(2) * self.weight).sum(-1) + self.bias  # (B, N, C), elementwise: fp32 under autocast
        c = torch.softmax(b, dim=2)  # over parents
        a_in = length(u)  # (B, N)
        ca = c * a_in.unsqueeze(-1)  # (B, N, C): c_ij a_i
        mass = ca.sum(1)  # (B, C)
        a = mass / (a_in.sum(1, keepdim=True) + MASS_EPS)  # (B, C) parent activations
        pose = ((ca / (mass.unsqueeze(1) + MASS_EPS)).unsqueeze(-1) * u_hat).sum(1)  # (B, C, D)
        return Routed(a.unsqueeze(-1) * unit(pose), c, b)
