"""Batched affine transforms on the device (affine_grid + grid_sample), for affNIST-style tests.

Conventions, in pixel units with the image centre as origin, x to the right and y downward:
``rotation`` in degrees, positive = counter-clockwise as displayed; ``scale`` isotropic (> 1
enlarges the digit); ``shear`` is the x-shear x' = x + shear * y; ``tx``, ``ty`` in pixels
(right, down). The forward map is x' = s R(rotation) Sh(shear) x + t. Resampling is bilinear
with zero padding (align_corners=False) and pixels are clamped to [0, 1]. Images whose
parameters are the identity are returned unchanged (grid_sample alone is off by ~1e-6), so an
identity transform gives exactly the clean accuracy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from capsbench.core.registry import Registry

TRANSFORMS: Registry[Callable[[Tensor, float], Tensor]] = Registry("transform")
UNITS = {
    "rotation": "degrees, counter-clockwise",
    "scale": "factor, > 1 enlarges",
    "shear": "x-shear factor, x' = x + s*y",
    "translation": "pixels to the right",
}
IDENTITY = {"rotation": 0.0, "scale": 1.0, "shear": 0.0, "translation": 0.0}


def linear_part(rotation_deg: Tensor, scale: Tensor, shear: Tensor) -> Tensor:
    """(B, 2, 2) forward matrices A = scale * R(rotation) @ Sh(shear) in (x right, y down) coordinates."""
    a = torch.deg2rad(rotation_deg)
    c, s = torch.cos(a), torch.sin(a)
    rot = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)  # CCW on screen (y down)
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    sh = torch.stack([torch.stack([one, shear], -1), torch.stack([zero, one], -1)], -2)
    return rot @ sh * scale.view(-1, 1, 1)


def theta_from(A: Tensor, t: Tensor, size: int) -> Tensor:
    """affine_grid's theta for the forward map x' = A x + t (t in pixels, (B, 2)).

    affine_grid maps OUTPUT coordinates to INPUT coordinates, so theta is the inverse map
    x = A^-1 (x' - t). With align_corners=False the normalised range [-1, 1] spans the whole
    image (S pixels), so a pixel offset is 2/S normalised units on both axes of a square image.
    """
    a, b, c, d = A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1]
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / (a * d - b * c).view(-1, 1, 1)
    t_norm = t * (2.0 / size)  # (B, 2)
    return torch.cat([inv, -(inv @ t_norm.unsqueeze(-1))], dim=2)  # (B, 2, 3)


def affine_matrix(rotation_deg: Tensor, scale: Tensor, shear: Tensor, tx: Tensor, ty: Tensor, size: int) -> Tensor:
    """(B, 2, 3) theta for affine_grid from per-example parameters (each (B,)); translation in pixels."""
    return theta_from(linear_part(rotation_deg, scale, shear), torch.stack([tx, ty], -1), size)


def apply_affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample (B, 1, S, S) images with ``theta`` (B, 2, 3); identity rows come back unchanged."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)
    eye = torch.eye(2, 3, device=theta.device, dtype=theta.dtype)
    identity = (theta == eye).all(2).all(1)  # (B,)
    return torch.where(identity.view(-1, 1, 1, 1), x, out)


def transform(x: Tensor, rotation: Tensor, scale: Tensor, shear: Tensor, tx: Tensor, ty: Tensor) -> Tensor:
    """Apply per-example parameters (each (B,)) to (B, 1, S, S) images."""
    return apply_affine(x, affine_matrix(rotation, scale, shear, tx, ty, x.shape[-1]))


def single_factor(x: Tensor, factor: str, value: float) -> Tensor:
    """One factor at ``value`` for every image, the others at identity.

    ``translation`` shifts by ``value`` pixels along x (to the right; negative = left), a
    deterministic choice so that a sweep value means one thing.
    """
    TRANSFORMS.get(factor)  # unknown names get the registry's error
    if value == IDENTITY[factor]:
        return x
    params = {"rotation": 0.0, "scale": 1.0, "shear": 0.0, "tx": 0.0, "ty": 0.0}
    params["tx" if factor == "translation" else factor] = float(value)
    B = x.shape[0]
    full = {k: torch.full((B,), v, device=x.device, dtype=torch.float32) for k, v in params.items()}
    return transform(x, **full)


def _register(name: str) -> None:
    TRANSFORMS.register(name, unit=UNITS[name], identity=IDENTITY[name])(lambda x, v: single_factor(x, name, v))


for _name in UNITS:
    _register(_name)


def digit_boxes(x: Tensor) -> Tensor:
    """(B, 4) boxes (x0, y0, x1, y1) of the nonzero pixels' centres, in centred pixel coordinates.

    An empty image gets the box (0, 0, 0, 0).
    """
    S = x.shape[-1]
    mask = x[:, 0] > 0  # (B, S, S)
    idx = torch.arange(S, device=x.device, dtype=torch.float32)
    cols, rows = mask.any(1).float(), mask.any(2).float()  # (B, S): which columns / rows have ink

    def first(m: Tensor) -> Tensor:
        return (idx * m + S * (1 - m)).min(1).values

    def last(m: Tensor) -> Tensor:
        return (idx * m - S * (1 - m)).max(1).values

    box = torch.stack([first(cols), first(rows), last(cols), last(rows)], 1) - (S - 1) / 2
    empty = cols.sum(1) == 0
    return torch.where(empty.unsqueeze(1), torch.zeros_like(box), box)


def translation_range(x: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Per image and axis, the shifts (lo, hi), each (B, 2) in pixels, that keep the digit inside.

    The digit's box is mapped by A; bilinear sampling then spreads ink by less than
    |A[i, 0]| + |A[i, 1]| pixels along axis i, so that margin is kept from the outermost pixel
    centres: the transformed digit never touches the border pixels. lo > hi: it does not fit.
    """
    S = x.shape[-1]
    x0, y0, x1, y1 = digit_boxes(x).unbind(1)
    corners = torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                           torch.stack([x0, y1], -1), torch.stack([x1, y1], -1)], 1)  # (B, 4, 2)  # fmt: skip
    moved = corners @ A.transpose(1, 2)  # (B, 4, 2)
    half = (S - 1) / 2 - A.abs().sum(2)  # (B, 2)
    return -half - moved.min(1).values, half - moved.max(1).values


def affine_from_uniforms(x: Tensor, u: Tensor, rotation: float = 20.0, shear: float = 0.2,
                         scale: tuple[float, float] = (0.8, 1.2), translate: bool = True,
                         ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The composite transform of :func:`random_affine` from given uniforms ``u`` (B, 5) in [0, 1)."""
    u = u.to(x.device)
    p = {
        "rotation": (2 * u[:, 0] - 1) * rotation,
        "shear": (2 * u[:, 1] - 1) * shear,
        "scale": scale[0] + (scale[1] - scale[0]) * u[:, 2],
    }
    A = linear_part(p["rotation"], p["scale"], p["shear"])
    lo, hi = translation_range(x, A)
    fits = lo <= hi  # (B, 2), per axis
    shift = torch.where(fits, lo + (hi - lo) * u[:, 3:5], torch.zeros_like(lo))
    shift = shift if translate else torch.zeros_like(shift)
    p["tx"], p["ty"] = shift[:, 0], shift[:, 1]
    p["fits"] = fits.all(1)
    return apply_affine(x, theta_from(A, shift, x.shape[-1])), p


def random_affine(x: Tensor, generator: torch.Generator, rotation: float = 20.0, shear: float = 0.2,
                  scale: tuple[float, float] = (0.8, 1.2), translate: bool = True,
                  ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """affNIST-style composite (Tieleman 2013 ranges are not published; these are the commonly
    quoted ones): per image rotation U[-r, r] deg, shear U[-s, s], scale U[lo, hi], and a
    translation uniform, per axis, within the range that keeps the transformed digit inside the
    canvas (0 on an axis where it does not fit). Returns the images and per-example parameters
    (rotation, shear, scale, tx, ty, fits). The uniforms are drawn on the generator's device, so
    a CPU generator gives the same images on every device.
    """
    u = torch.rand(x.shape[0], 5, generator=generator, device=generator.device)
    return affine_from_uniforms(x, u, rotation, shear, scale, translate)
