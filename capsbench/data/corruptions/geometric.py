"""Geometric corruptions of MNIST-C (Mu & Gilmer 2019): shear, scale, rotate and translate, each an
``skimage.transform.warp`` with an inverse map about the image centre (13.5, 13.5), bilinear, zero fill."""

from __future__ import annotations

import torch
from torch import Tensor

from capsbench.data.corruptions.filters import centred, warp
from capsbench.data.corruptions.registry import corruption
from capsbench.data.corruptions.rng import signs

SHEAR = 0.4  # radians, severity 2
ROTATION = 0.4  # radians, severity 2
SCALE = 1 / 0.7  # the inverse map's factor, severity 3: the digit shrinks to 70%
SHIFT = 3.0  # pixels per axis, severity 3


def about_centre(x: Tensor, A: Tensor, mode: str = "bilinear") -> Tensor:
    """Warp (B, 1, 28, 28) images with the inverse map p -> A p + t that keeps (13.5, 13.5) fixed."""
    return warp(x, A, centred(A), mode).clamp(0, 1)


def shear_matrix(c: Tensor) -> Tensor:
    """(B, 2, 2) skimage's old ``AffineTransform(shear=c)``: [[1, -sin c], [0, cos c]] on (col, row)."""
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    return torch.stack([torch.stack([one, -torch.sin(c)], -1), torch.stack([zero, torch.cos(c)], -1)], -2)


def rotation_matrix(c: Tensor) -> Tensor:
    """(B, 2, 2) ``AffineTransform(rotation=c)``: [[cos c, -sin c], [sin c, cos c]] on (col, row)."""
    cos, sin = torch.cos(c), torch.sin(c)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def rotate_by(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate each image by ``angles`` (B,) radians as the reference's inverse map does (positive
    angles turn the digit counter-clockwise on screen)."""
    return about_centre(x, rotation_matrix(angles.to(x.device).float()))


def shear_by(x: Tensor, shears: Tensor) -> Tensor:
    """Shear each image by ``shears`` (B,) radians (the reference's inverse map)."""
    return about_centre(x, shear_matrix(shears.to(x.device).float()))


def shift_by(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """The reference's ``AffineTransform(translation=[dx, dy])`` as inverse map: output (c, r) reads
    input (c + dx, r + dy), so the digit moves by (-dx, -dy). Whole pixels, sampled exactly (nearest)."""
    A = torch.eye(2, device=x.device).expand(len(x), 2, 2)
    return warp(x, A, torch.stack([dx, dy], 1).to(x.device).float(), mode="nearest")


@corruption("shear", "shear by 0.4 rad with a random sign about the centre (old skimage shear matrix)")
def shear(x: Tensor, seed: int, start: int) -> Tensor:
    return shear_by(x, SHEAR * signs(seed, "shear", start, len(x), 1, x.device)[:, 0])


@corruption("scale", "shrink to 70% about the centre (inverse map scaled by 1/0.7)")
def scale(x: Tensor, seed: int, start: int) -> Tensor:
    A = SCALE * torch.eye(2, device=x.device).expand(len(x), 2, 2)
    return about_centre(x, A)


@corruption("rotate", "rotate by 0.4 rad (23 degrees) with a random sign about the centre")
def rotate(x: Tensor, seed: int, start: int) -> Tensor:
    return rotate_by(x, ROTATION * signs(seed, "rotate", start, len(x), 1, x.device)[:, 0])


@corruption("translate", "shift by 3 px on both axes, a random sign per axis, zero fill")
def translate(x: Tensor, seed: int, start: int) -> Tensor:
    s = SHIFT * signs(seed, "translate", start, len(x), 2, x.device)  # (B, 2): dx, dy
    return shift_by(x, s[:, 0], s[:, 1])
