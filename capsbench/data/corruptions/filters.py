"""The image filters the MNIST-C corruptions (Mu & Gilmer 2019) are built from, in torch, with the
conventions of the reference's scipy/scikit-image calls: Gaussian blur as
``scipy.ndimage.gaussian_filter`` (truncate 4, a normalised sampled kernel), Sobel as
``scipy.ndimage.sobel``, and warps as ``skimage.transform.warp`` (bilinear, zero outside)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TRUNCATE = 4.0  # scipy's gaussian_filter default: the kernel reaches truncate * sigma pixels


def gaussian_kernel(sigma: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """(2r + 1,) normalised Gaussian taps, r = int(4 sigma + 0.5), as scipy's gaussian_filter1d."""
    r = int(TRUNCATE * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * t * t / (sigma * sigma))
    return (w / w.sum()).to(dtype)


def blur_1d(x: Tensor, taps: Tensor, dim: int, mode: str) -> Tensor:
    """Correlate (B, 1, H, W) images with ``taps`` along ``dim`` (-2 rows, -1 columns);
    ``mode``: "replicate" (scipy's "nearest") or "constant" (zeros)."""
    r = (len(taps) - 1) // 2
    pad = (0, 0, r, r) if dim == -2 else (r, r, 0, 0)
    weight = taps.to(x).view(1, 1, -1, 1) if dim == -2 else taps.to(x).view(1, 1, 1, -1)
    padded = F.pad(x, pad, mode=mode) if mode != "constant" else F.pad(x, pad)
    return F.conv2d(padded, weight)


def gaussian_blur(x: Tensor, sigma: float, dims: tuple[int, ...] = (-2, -1), mode: str = "replicate") -> Tensor:
    """Gaussian blur of (B, 1, H, W) images along ``dims`` (skimage's ``gaussian`` default mode is
    "nearest" = replicate; its canny smooths with zeros outside, mode "constant")."""
    taps = gaussian_kernel(sigma)
    for d in dims:
        x = blur_1d(x, taps, d, mode)
    return x


def sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """(d/drow, d/dcol) of (B, 1, H, W) images as scipy's ``ndimage.sobel(axis=0 / 1)``: [-1, 0, 1]
    across, [1, 2, 1] along, edges mirrored (scipy "reflect" = replicate for a 1-pixel pad)."""
    d = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    s = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = F.conv2d(xp, torch.outer(d, s).view(1, 1, 3, 3))  # (B, 1, H, W)
    cols = F.conv2d(xp, torch.outer(s, d).view(1, 1, 3, 3))
    return rows, cols


def pixel_grid(size: int, device: torch.device) -> Tensor:
    """(size * size, 2) pixel-centre coordinates (col, row) in row-major order."""
    idx = torch.arange(size, dtype=torch.float32, device=device)
    rr, cc = torch.meshgrid(idx, idx, indexing="ij")
    return torch.stack([cc.reshape(-1), rr.reshape(-1)], 1)


def warp(x: Tensor, A: Tensor, t: Tensor, mode: str = "bilinear") -> Tensor:
    """``skimage.transform.warp(x, inverse_map)`` for the affine inverse map (col, row) -> A (col, row) + t
    (A (B, 2, 2), t (B, 2) in pixels): output pixel p reads input point A p + t, bilinear, zero
    outside. Pixel centres are integer coordinates, so normalised = 2 p / (S - 1) - 1 (align_corners=True)."""
    B, _, S, _ = x.shape
    p = pixel_grid(S, x.device).to(x.dtype)  # (S*S, 2)
    A, t = A.to(x.dtype).unsqueeze(1), t.to(x.dtype).unsqueeze(1)  # (B, 1, 2, 2), (B, 1, 2)
    # elementwise products, not a matmul: each image's grid is then the same at any batch size
    src = A[..., 0] * p[:, :1] + A[..., 1] * p[:, 1:] + t  # (B, S*S, 2): column j of A times coordinate j
    grid = (src * (2.0 / (S - 1)) - 1.0).view(B, S, S, 2)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=True)


def centred(A: Tensor, centre: float = 13.5) -> Tensor:
    """(B, 2) translation that keeps ``centre`` fixed under the linear map A (B, 2, 2), as the
    reference computes it: t = centre * (1 - row sums of A)."""
    return centre * (1.0 - A.sum(-1))
