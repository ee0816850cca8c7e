"""Derived seeds: one rule for every random stream that must be a function of (seed, index)
alone (an epoch's order, a step's batch, a copy of a test set), so a resumed or re-batched run
draws the same numbers without saving any generator state."""

from __future__ import annotations

STRIDE = 1_000_003  # a prime larger than any index used, so (seed, index) pairs never collide


def derive_seed(seed: int, index: int) -> int:
    """The seed of stream ``index`` under ``seed``: ``seed * STRIDE + index``."""
    return seed * STRIDE + index
