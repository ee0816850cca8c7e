"""Blur corruptions of MNIST-C (Mu & Gilmer 2019): glass blur (blur, local pixel shuffling, blur)
and ImageMagick's motion blur."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from capsbench.data.corruptions.filters import gaussian_blur
from capsbench.data.corruptions.registry import corruption
from capsbench.data.corruptions.rng import per_image

GLASS_SIGMA, GLASS_ITERATIONS = 0.7, 2  # severity 1: (sigma, max_delta 1, iterations)
GLASS_SPAN = range(27, 1, -1)  # rows/columns visited, 27 down to 2 (range(28 - 1, 1, -1))
MOTION_RADIUS, MOTION_SIGMA, MOTION_ANGLE = 10.0, 3.0, 45.0  # severity 1; angle U(-45, 45) degrees


def glass_permutation(seed: int, start: int, n: int) -> Tensor:
    """(n, 784) source pixel of each output pixel after the reference's sequential swaps: for 2
    iterations, rows h and then columns w from 27 down to 2, with probability 1/2 swap pixel (h, w)
    with (h + dy, w + dx), dx, dy in {-1, 0} (``randint(-1, 1)``'s exclusive bound)."""
    steps = GLASS_ITERATIONS * len(GLASS_SPAN) ** 2
    bits = per_image(seed, "glass_blur", start, n, lambda g: torch.randint(0, 2, (steps, 3), generator=g))
    bits = bits.permute(1, 2, 0).contiguous()  # (steps, 3, n): swap?, -dx, -dy
    perm, rows = torch.arange(784).repeat(n, 1), torch.arange(n)
    k = 0
    for _ in range(GLASS_ITERATIONS):
        for h in GLASS_SPAN:
            for w in GLASS_SPAN:
                swap, ndx, ndy = bits[k]
                p, q = h * 28 + w, (h - ndy) * 28 + (w - ndx)  # q: (n,)
                vp, vq = perm[:, p].clone(), perm[rows, q]
                perm[:, p] = torch.where(swap.bool(), vq, vp)
                perm[rows, q] = torch.where(swap.bool(), vp, vq)
                k += 1
    return perm


@corruption("glass_blur", "Gaussian blur (sigma 0.7, vertical only, as released), local pixel swaps, blur again")
def glass_blur(x: Tensor, seed: int, start: int) -> Tensor:
    """The reference's ``gaussian(..., multichannel=True)`` on a (28, 28) array treats the columns as
    channels, so both blurs run along the rows' axis only (vertical); the first result is stored as
    uint8 (floor) before the shuffle, as there."""
    y = gaussian_blur(x, GLASS_SIGMA, dims=(-2,))  # (B, 1, 28, 28)
    y = torch.floor(y * 255) / 255
    perm = glass_permutation(seed, start, len(x)).to(x.device)  # (B, 784)
    y = y.flatten(1).gather(1, perm).view_as(x)
    return gaussian_blur(y, GLASS_SIGMA, dims=(-2,)).clamp(0, 1)


def motion_kernels(angles: Tensor, size: int) -> Tensor:
    """(B, size, size) kernels of ImageMagick's MotionBlurImage for ``angles`` (B,) in degrees:
    width = 2 ceil(radius) + 1 taps exp(-i^2 / (2 sigma^2)), normalised, at pixel offsets
    (ceil(i cos a - 0.5), ceil(i sin a - 0.5)) for i = 0..width-1, centred in the kernel."""
    width = 2 * math.ceil(MOTION_RADIUS) + 1
    i = torch.arange(width, dtype=torch.float64)
    taps = torch.exp(-i * i / (2 * MOTION_SIGMA**2))
    taps = taps / taps.sum()  # (width,)
    a = torch.deg2rad(angles.double()).unsqueeze(1)  # (B, 1)
    ox = torch.ceil(i * torch.cos(a) - 0.5).long()  # (B, width) column offsets
    oy = torch.ceil(i * torch.sin(a) - 0.5).long()  # row offsets (y down)
    c = size // 2
    k = torch.zeros(len(angles), size * size, dtype=torch.float64)
    k.scatter_add_(1, (c + oy) * size + (c + ox), taps.expand(len(angles), -1))
    return k.view(-1, size, size)


@corruption("motion_blur", "ImageMagick motion blur: radius 10, sigma 3, angle U(-45, 45) degrees")
def motion_blur(x: Tensor, seed: int, start: int) -> Tensor:
    """Each output pixel is the weighted sum of the pixels along its motion direction (one-sided
    half-Gaussian); outside the image the edge pixel is repeated (ImageMagick's default virtual pixels)."""
    B = len(x)
    angles = per_image(seed, "motion_blur", start, B, lambda g: torch.rand(1, dtype=torch.float64, generator=g))
    angles = MOTION_ANGLE * (2 * angles[:, 0] - 1)  # (B,) degrees
    r = 2 * math.ceil(MOTION_RADIUS)  # the kernel's reach
    k = motion_kernels(angles, 2 * r + 1).to(x)  # (B, 2r+1, 2r+1)
    xp = F.pad(x, (r, r, r, r), mode="replicate")  # (B, 1, 28 + 2r, 28 + 2r)
    out = F.conv2d(xp.view(1, B, *xp.shape[-2:]), k.unsqueeze(1), groups=B)  # correlation: out(p) = sum k(o) x(p + o)
    return out.view_as(x).clamp(0, 1)
