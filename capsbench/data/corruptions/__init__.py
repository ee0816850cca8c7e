"""The 15 MNIST-C corruptions (Mu & Gilmer 2019, "MNIST-C: A Robustness Benchmark for Computer
Vision", arXiv 1906.02337) in torch, at the severity of the released data.

Every corruption is ``fn(x, seed, start) -> x'`` on (B, 1, 28, 28) floats in [0, 1] on any device,
registered in ``CORRUPTIONS`` with a one-line description (``CORRUPTIONS.meta(name)["about"]``).
Image ``start + b`` of a set draws its randomness from its own CPU generator seeded from
(seed, name, start + b) (``rng.py``): the same images for a seed at any batch size, on any device.
Where torch cannot or does not reproduce the reference (google-research/mnist-c
``corruptions.py``), docs/corruptions.md says how it differs.
"""

from __future__ import annotations

from torch import Tensor

from capsbench.data.corruptions import blur, edges, geometric, noise, overlays, photometric  # noqa: F401 (they register)
from capsbench.data.corruptions.registry import CORRUPTIONS, NAMES, corruption


def corrupt(name: str, x: Tensor, seed: int, start: int = 0) -> Tensor:
    """Corruption ``name`` of images ``start .. start + B - 1`` of a set, x (B, 1, 28, 28) in [0, 1]."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 28, 28):
        raise ValueError(f"MNIST-C corruptions take (B, 1, 28, 28) images, got {tuple(x.shape)}")
    return CORRUPTIONS.get(name)(x, seed, start)


__all__ = ["CORRUPTIONS", "NAMES", "corrupt", "corruption"]
