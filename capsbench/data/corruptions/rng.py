"""Per-image random streams for the corruptions: each image's draws come from its own CPU
``torch.Generator`` seeded from (seed, corruption name, the image's index in the set), so a seed
gives the same corrupted images whatever the batch size or the device."""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor


def image_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for image ``index`` of corruption ``name`` under ``seed`` (a stable hash:
    Python's ``hash`` of a str changes from process to process)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_generator(seed: int, name: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(image_seed(seed, name, index))


def per_image(seed: int, name: str, start: int, n: int, draw: Callable[[torch.Generator], Tensor]) -> Tensor:
    """``draw(g)`` for images start..start+n-1, each with its own generator, stacked: (n, ...) on the CPU."""
    return torch.stack([draw(image_generator(seed, name, start + i)) for i in range(n)])


def uniform(seed: int, name: str, start: int, n: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """(n, *shape) uniforms in [0, 1), image by image, moved to ``device``."""
    return per_image(seed, name, start, n, lambda g: torch.rand(shape, generator=g)).to(device)


def normal(seed: int, name: str, start: int, n: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """(n, *shape) standard normals, image by image, moved to ``device``."""
    return per_image(seed, name, start, n, lambda g: torch.randn(shape, generator=g)).to(device)


def signs(seed: int, name: str, start: int, n: int, k: int, device: torch.device) -> Tensor:
    """(n, k) random signs +-1.0 (float32), image by image."""
    bits = per_image(seed, name, start, n, lambda g: torch.randint(0, 2, (k,), generator=g))
    return (2.0 * bits - 1.0).float().to(device)
