"""Dynamic routing, routing-by-agreement (Sabour, Frosst & Hinton, NIPS 2017, Procedure 1).

Parameters: none of its own. The paper CapsNet at 28x28 (N = 1152, C = 10, D = 16, P = 8):
W = N C D P = 1,474,560, plus Conv1 20,992, PrimaryCaps 5,308,672 and the decoder 1,411,344:
8,215,568 parameters (the paper's count).
"""

from __future__ import annotations

from torch import Tensor

from capsbench.models.heads.base import HEADS, Routed, RoutingHead
from capsbench.models.routing import dynamic_routing, parent_major_routing


@HEADS.register("dynamic", description="routing-by-agreement (Sabour et al. 2017), routing_iters iterations")
class DynamicHead(RoutingHead):
    """Couplings c = softmax over parents of logits b that grow by the agreement u_hat . v,
    ``routing_iters`` times; on a fp32 CPU the parent-major formulation (same function)."""

    has_parent_major = True
    iterates = True

    def forward(self, u_hat: Tensor, u: Tensor, parent_major: bool = False) -> Routed:
        spec = self.spec
        if parent_major:  # (B, C, N, D): both contractions become batched matrix-vector products
            return Routed(*parent_major_routing(u_hat.transpose(1, 2).contiguous(), spec.iters, spec.inner_grad))
        return Routed(*dynamic_routing(u_hat, spec.iters, spec.inner_grad))
