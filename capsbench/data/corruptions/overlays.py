"""Overlay corruptions of MNIST-C (Mu & Gilmer 2019): mud spatter, a dotted line and a zigzag,
drawn over the digit."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from capsbench.data.corruptions.filters import gaussian_blur
from capsbench.data.corruptions.registry import corruption
from capsbench.data.corruptions.rng import normal, per_image

# spatter, severity 4: liquid N(0.65, 0.3), blur sigma 1, threshold 0.65; mask blur 1.5, cut 0.8; mud 63/255
LIQUID_MEAN, LIQUID_STD, LIQUID_SIGMA, LIQUID_CUT, MASK_SIGMA, MASK_CUT = 0.65, 0.3, 1.0, 0.65, 1.5, 0.8
MUD = 63 / 255
LINE_REACH = 2.3  # a line's intensity is log(1 - d / 2.3) + 1 at vertical distance d, clipped to [0, 1]
ZIG_A, ZIG_B, ZIG_C0, ZIG_C1 = 2.0, 2.0, 2, 25  # zigzag: segment length, amplitude, first and last column


@corruption("spatter", "mud spatter: thresholded blurred noise blobs painted 63/255 grey")
def spatter(x: Tensor, seed: int, start: int) -> Tensor:
    liquid = LIQUID_MEAN + LIQUID_STD * normal(seed, "spatter", start, len(x), tuple(x.shape[1:]), x.device)
    liquid = gaussian_blur(liquid.to(x.dtype), LIQUID_SIGMA)  # (B, 1, 28, 28)
    m = gaussian_blur((liquid > LIQUID_CUT).to(x.dtype), MASK_SIGMA)
    m = torch.where(m < MASK_CUT, torch.zeros_like(m), m)
    return (x * (1 - m) + MUD * m).clamp(0, 1)


def python_slice_end(v: Tensor, size: int = 28) -> Tensor:
    """Where numpy's ``a[:, :v]`` ends for an integer tensor v (negative v counts from the end)."""
    return torch.where(v >= 0, v, (size + v).clamp(min=0))


def line_from_points(c0: Tensor, r0: Tensor, c1: Tensor, r1: Tensor) -> Tensor:
    """(B, 28, 28) the reference's ``line_from_points`` for (B,) float64 endpoints: intensity
    clip(log(1 - d / 2.3) + 1, 0, 1) at vertical distance d from the line through the points,
    between columns floor(c0) and ceil(c1) (exclusive); zero where c0 == c1."""
    idx = torch.arange(28, dtype=torch.float64, device=c0.device)
    run = torch.where(c1 == c0, torch.ones_like(c1), c1 - c0)
    f = (r1 - r0).div(run).unsqueeze(1) * (idx - c0.unsqueeze(1)) + r0.unsqueeze(1)  # (B, 28): row at each column
    dist = (idx.view(1, 28, 1) - f.unsqueeze(1)).abs().clamp(0, LINE_REACH - 1e-10)  # (B, rows, cols)
    line = (torch.log(1 - dist / LINE_REACH) + 1).clamp(0, 1)
    lo = python_slice_end(torch.floor(c0).long()).unsqueeze(1)  # (B, 1)
    hi = python_slice_end(torch.ceil(c1).long()).unsqueeze(1)
    cols = torch.arange(28, device=c0.device)
    keep = (cols >= lo) & (cols < hi) & (c1 != c0).unsqueeze(1)  # (B, 28)
    return line * keep.unsqueeze(1)


def random_rows(seed: int, name: str, start: int, n: int, low: int, high: int, k: int) -> Tensor:
    """(n, k) integers in [low, high) as float64 (``np.random.randint``'s bounds), image by image."""
    return per_image(seed, name, start, n, lambda g: torch.randint(low, high, (k,), generator=g)).double()


@corruption("dotted_line", "a dotted line from column 0 to 27 between random rows")
def dotted_line(x: Tensor, seed: int, start: int) -> Tensor:
    """The line keeps columns whose 2-column band is odd (2-3, 6-7, ..., 26); column 27 is cut by
    ``line_from_points`` itself (ceil(27) is an exclusive bound)."""
    rows = random_rows(seed, "dotted_line", start, len(x), 0, 27, 2).to(x.device)  # (B, 2): r0, r1
    zero, last = torch.zeros_like(rows[:, 0]), torch.full_like(rows[:, 0], 27.0)
    line = line_from_points(zero, rows[:, 0], last, rows[:, 1])  # (B, 28, 28)
    dots = (torch.arange(28, device=x.device) // 2) % 2 == 1  # (28,) the kept bands
    return (x + (line * dots).unsqueeze(1).to(x)).clamp(0, 1)


def zigzag_points(r0: float, r1: float) -> list[tuple[float, float]]:
    """The reference zigzag's endpoints (col, row): teeth of length 2 and amplitude 2 along the line
    from (2, r0) to (25, r1), ending in its quirky last point (d, r / (2 (d - max_c)))."""
    theta = math.atan((r1 - r0) / (ZIG_C1 - ZIG_C0))
    d = (ZIG_C1 - ZIG_C0) / math.cos(theta)
    pts, r_i = [(0.0, 0.0)], 0.0
    for i in range(int((d - ZIG_A) // (2 * ZIG_A)) + 1):
        r_i = (-1) ** i * ZIG_B
        pts.append(((2 * i + 1) * ZIG_A, r_i))
    max_c = (2 * ZIG_A) * (d // (2 * ZIG_A))
    if d != max_c:
        pts.append((d, r_i / (2 * (d - max_c))))
    cos, sin = math.cos(theta), math.sin(theta)
    return [(cos * c - sin * r + ZIG_C0, sin * c + cos * r + r0) for c, r in pts]


def zigzag_draws(g: torch.Generator) -> Tensor:
    """(2,) the first row r0 in [0, 27) and the row change r1 - r0 in [-5, 5) (``randint`` bounds)."""
    return torch.cat([torch.randint(0, 27, (1,), generator=g), torch.randint(-5, 5, (1,), generator=g)])


def zigzag_segments(rows: Tensor) -> Tensor:
    """(B, K, 4) segments (c0, r0, c1, r1) float64 for the rows (B, 2) = (r0, r1 - r0); images with
    fewer segments are padded with empty ones (c0 == c1)."""
    paths = [zigzag_points(r0, r0 + dr) for r0, dr in rows.tolist()]
    K = max(len(p) for p in paths) - 1
    segs = torch.zeros(len(paths), K, 4, dtype=torch.float64)
    for b, p in enumerate(paths):
        segs[b, : len(p) - 1] = torch.tensor([(*p[i - 1], *p[i]) for i in range(1, len(p))], dtype=torch.float64)
    return segs


@corruption("zigzag", "a zigzag (teeth 2 px long, 2 px high) across columns 2-25, row change +-5")
def zigzag(x: Tensor, seed: int, start: int) -> Tensor:
    """The reference adds the segments one by one, clipping each time; the segments are
    non-negative, so one sum clipped once is the same."""
    B = len(x)
    rows = per_image(seed, "zigzag", start, B, zigzag_draws)  # (B, 2): r0 in [0, 27), r1 - r0 in [-5, 5)
    segs = zigzag_segments(rows.double()).to(x.device)  # (B, K, 4)
    lines = line_from_points(*segs.flatten(0, 1).unbind(1)).view(B, -1, 28, 28).sum(1)  # (B, 28, 28)
    return (x + lines.unsqueeze(1).to(x)).clamp(0, 1)
