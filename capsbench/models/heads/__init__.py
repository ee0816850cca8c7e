"""Routing heads for CapsNet, one file per head, selected by CapsNet's ``routing`` option.

``HEADS`` maps a name to a ``RoutingHead`` class; ``build_head(name, spec)`` builds one. Heads:
dynamic (Sabour et al. 2017), uniform (Paik et al. 2019's control), em (Hinton et al. 2018),
self (Hahn et al. 2019), attention (Mazzia et al. 2021), max-pool and avg-pool (pooling controls).
"""

from __future__ import annotations

from capsbench.models.heads import attention, dynamic, em, pool, self_routing, uniform  # noqa: F401 (they register)
from capsbench.models.heads.base import HEADS, HeadSpec, Routed, RoutingHead


def build_head(name: str, spec: HeadSpec) -> RoutingHead:
    """The routing head ``name`` built for ``spec`` (unknown names refused with the known ones)."""
    return HEADS.get(name)(spec)


__all__ = ["HEADS", "HeadSpec", "Routed", "RoutingHead", "build_head"]
