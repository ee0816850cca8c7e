"""Batched affine transforms on the device (affine_grid + grid_sample), for affNIST-style tests.

Conventions (pixel units, image centre as origin, x right, y down): ``rotation`` in degrees,
positive = counter-clockwise as displayed; ``scale`` isotropic (> 1 enlarges the digit);
``shear`` x' = x + shear * y; translation ``tx``, ``ty`` in pixels (right, down). Identity
parameters return the input unchanged (no resampling), so identity accuracy equals clean.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from capsbench.registry import Registry

TRANSFORMS: Registry[Callable[[Tensor, float], Tensor]] = Registry("transform")
UNITS = {"rotation": "degrees", "scale": "factor", "shear": "x-shear factor", "translation": "pixels (to the right)"}
IDENTITY = {"rotation": 0.0, "scale": 1.0, "shear": 0.0, "translation": 0.0}


def linear_part(rotation_deg: Tensor, scale: Tensor, shear: Tensor) -> Tensor:
    """(B, 2, 2) forward matrices A = R(rotation) @ Shear @ Scale, in (x right, y down) coordinates."""
    a = torch.deg2rad(rotation_deg)
    c, s = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # CCW on screen (y down)
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    sh = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    return rot @ sh * scale.view(-1, 1, 1)


def affine_theta(A: Tensor, tx: Tensor, ty: Tensor, size: int) -> Tensor:
    """affine_grid's theta (output -> input, normalised coords) for the forward map x' = A x + t."""
    inv = torch.linalg.inv(A)  # (B, 2, 2)
    t = torch.stack([tx, ty], -1) * (2.0 / size)  # pixels -> normalised units (align_corners=False)
    return torch.cat([inv, -(inv @ t.unsqueeze(-1))], dim=2)  # (B, 2, 3)


def apply_affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample (B, 1, S, S) images with bilinear interpolation and zero padding; clamp to [0, 1]."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)


def transform(x: Tensor, rotation: Tensor, scale: Tensor, shear: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Apply per-example parameters (each (B,)) to (B, 1, S, S) images."""
    theta = affine_theta(linear_part(rotation, scale, shear), tx, ty, x.shape[-1])
    return apply_affine(x, theta)


def single_factor(x: Tensor, factor: str, value: float) -> Tensor:
    """One factor at ``value`` (the same for every image), the others at identity."""
    TRANSFORMS.get(factor)
    if value == IDENTITY[factor]:
        return x
    params = {"rotation": 0.0, "scale": 1.0, "shear": 0.0, "tx": 0.0, "ty": 0.0}
    params["tx" if factor == "translation" else factor] = float(value)
    B = x.shape[0]
    full = {k: torch.full((B,), v, device=x.device, dtype=torch.float32) for k, v in params.items()}
    return transform(x, **full)


for _name in UNITS:
    TRANSFORMS.register(_name, unit=UNITS[_name])(lambda x, v, _f=_name: single_factor(x, _f, v))


def digit_boxes(x: Tensor) -> Tensor:
    """(B, 4) bounding boxes (x0, y0, x1, y1) of the nonzero pixels, in centred pixel coordinates."""
    S = x.shape[-1]
    mask = x[:, 0] > 0  # (B, S, S)
    idx = torch.arange(S, device=x.device, dtype=torch.float32)
    cols, rows = mask.any(1).float(), mask.any(2).float()  # (B, S)
    empty = cols.sum(1) == 0
    first = lambda m: (idx * m + S * (1 - m)).min(1).values  # noqa: E731
    last = lambda m: (idx * m - S * (1 - m)).max(1).values  # noqa: E731
    box = torch.stack([first(cols), first(rows), last(cols), last(rows)], 1) - (S - 1) / 2
    return torch.where(empty.unsqueeze(1), torch.zeros_like(box), box)


def random_affine(x: Tensor, generator: torch.Generator, rotation: float = 20.0, shear: float = 0.2,
                  scale: tuple[float, float] = (0.8, 1.2), translate: bool = True) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """affNIST-style composite: per image, rotation U[-r, r] deg, shear U[-s, s], scale U[lo, hi],
    and a translation drawn uniformly from the range that keeps the transformed digit's bounding
    box inside the canvas (0 when it does not fit). Returns the images and the parameters."""
    B, S, dev = x.shape[0], x.shape[-1], x.device
    u = torch.rand(5, B, device=dev, generator=generator)
    p = {
        "rotation": (2 * u[0] - 1) * rotation,
        "shear": (2 * u[1] - 1) * shear,
        "scale": scale[0] + (scale[1] - scale[0]) * u[2],
    }
    A = linear_part(p["rotation"], p["scale"], p["shear"])
    x0, y0, x1, y1 = digit_boxes(x).unbind(1)
    corners = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                           torch.stack([x0, y1], -1), torch.stack([x1, y1], -1)], 1)  # (B, 4, 2)  # fmt: skip
    moved = corners @ A.transpose(1, 2)  # (B, 4, 2)
    half = (S - 1) / 2 - 1  # one pixel of margin: bilinear sampling spreads a pixel by up to 1
    lo, hi = -half - moved.min(1).values, half - moved.max(1).values  # (B, 2) allowed shifts
    fits = lo <= hi
    shift = torch.where(fits, lo + (hi - lo) * u[3:5].T, torch.zeros_like(lo)) if translate else torch.zeros_like(lo)
    p["tx"], p["ty"] = shift[:, 0], shift[:, 1]
    return transform(x, p["rotation"], p["scale"], p["shear"], p["tx"], p["ty"]), p
