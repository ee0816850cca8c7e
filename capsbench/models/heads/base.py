"""The routing-head interface: how CapsNet's class capsules are made from the children's votes.

A head receives the votes u_hat (B, N, C, D) of N child capsules for C class capsules (one D x P
matrix W[n, c] per pair, owned by CapsNet) and the children themselves (B, N, P), and returns
the class capsules with, where it has them, the coupling coefficients and routing logits.
``HEADS`` is the registry the head files add themselves to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from capsbench.core.registry import Registry
from capsbench.models.routing import SQUASH_EPS


class Routed(NamedTuple):
    """What a routing head returns."""

    v: Tensor  # (B, C, D) class capsules; their lengths are the class scores
    c: Tensor | None = None  # (B, N, C) coupling coefficients, summing to 1 over the C parents
    b: Tensor | None = None  # (B, N, C) routing logits


@dataclass(frozen=True)
class HeadSpec:
    """The shapes and routing options a head is built for (CapsNet's config)."""

    num_primary: int  # N primary capsules (1152 at 28x28)
    num_classes: int  # C class capsules
    class_dim: int  # D, the class capsules' dimension (16)
    child_dim: int  # P, the primary capsules' dimension (8)
    iters: int = 3  # routing iterations, for the heads that iterate
    inner_grad: bool = True  # backpropagate through the iterations before the last
    layout: tuple[int, int] | None = None  # (types, grid): the N children as types x grid x grid


class RoutingHead(nn.Module):
    """Votes (B, N, C, D) and children (B, N, P) -> ``Routed``. Subclasses set ``routes``
    (whether they return couplings) and may pool the children before they vote."""

    routes = True  # returns couplings c (B, N, C)
    has_parent_major = False  # has a CPU formulation on (B, C, N, D) votes (models/routing.py)
    iterates = False  # uses spec.iters (routing_iters): the routing-iterations part varies only these

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec

    @property
    def num_children(self) -> int:
        """The children that vote: W's first dimension (N, or fewer for a pooling head)."""
        return self.spec.num_primary

    @classmethod
    def own_params(cls, spec: HeadSpec) -> int:
        """The head's own parameter count: the formula its docstring derives (0: none)."""
        return 0

    def child_capsules(self, u: Tensor) -> Tensor:
        """The capsules that vote, from the primary capsules u (B, N, P): u itself by default."""
        return u

    def forward(self, u_hat: Tensor, u: Tensor, parent_major: bool = False) -> Routed:
        """Route votes u_hat (B, N, C, D) of children u (B, N, P); ``parent_major`` asks for the
        CPU formulation where the head has one (``has_parent_major``)."""
        raise NotImplementedError


def length(u: Tensor) -> Tensor:
    """|u| over the last dim, with eps inside the root so the gradient stays finite at 0."""
    return torch.sqrt((u * u).sum(-1) + SQUASH_EPS)


def unit(s: Tensor) -> Tensor:
    """s / |s| over the last dim (0 at s = 0, finite gradient there)."""
    return s * torch.rsqrt((s * s).sum(-1, keepdim=True) + SQUASH_EPS)


HEADS: Registry[type[RoutingHead]] = Registry("routing head")
