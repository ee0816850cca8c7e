"""Pooling controls (the operation capsules were proposed to replace; Hahn et al. 2019 compare
the same heads): the primary capsules (B, types x G x G, P) are pooled component-wise over the
G x G grid of each capsule type, to (B, types, P), and the pooled capsules vote for the classes
with uniform couplings, v = squash(sum_t u_hat_t / C). No routing, so no coupling returned.

Parameters: none of their own, but W shrinks to one matrix per (type, class): types C D P =
32 x 10 x 16 x 8 = 40,960. The paper CapsNet at 28x28 (32 types on a 6 x 6 grid, C = 10, D = 16,
P = 8): 6,741,008 outside the head (Conv1 20,992, PrimaryCaps 5,308,672, decoder 1,411,344)
plus 40,960: 6,781,968 parameters.
"""

from __future__ import annotations

from torch import Tensor

from capsbench.models.heads.base import HEADS, HeadSpec, Routed, RoutingHead
from capsbench.models.heads.uniform import uniform_routing


class PoolHead(RoutingHead):
    """Pool each capsule type over the grid (``reduce``), then uniform couplings."""

    routes = False
    reduce = "amax"  # the Tensor method pooling over the grid: amax or mean

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__(spec)
        if spec.layout is None:
            raise ValueError(f"{type(self).__name__} needs the primary capsules laid out types x grid x grid")

    @property
    def num_children(self) -> int:
        return self.spec.layout[0]  # type: ignore[index]

    def child_capsules(self, u: Tensor) -> Tensor:
        types, grid = self.spec.layout  # type: ignore[misc]
        grids = u.reshape(u.shape[0], types, grid * grid, u.shape[-1])  # capsule index = (type, row, col)
        return getattr(grids, self.reduce)(2)  # (B, types, P)

    def forward(self, u_hat: Tensor, u: Tensor, parent_major: bool = False) -> Routed:
        return Routed(uniform_routing(u_hat))


@HEADS.register("max-pool", description="max-pool each capsule type over the grid, uniform couplings")
class MaxPoolHead(PoolHead):
    reduce = "amax"


@HEADS.register("avg-pool", description="average each capsule type over the grid, uniform couplings")
class AvgPoolHead(PoolHead):
    reduce = "mean"
