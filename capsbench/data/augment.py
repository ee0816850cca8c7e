"""Batched, on-device augmentations on (B, C, H, W) float images; no per-image Python loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def to_float(x_u8: Tensor) -> Tensor:
    """uint8 images (B, H, W) or (B, C, H, W) -> (B, C, H, W) float in [0, 1] (C = 1 for (B, H, W))."""
    return (x_u8.unsqueeze(1) if x_u8.dim() == 3 else x_u8).float().div_(255.0)


def place(x: Tensor, canvas: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Put each (H, W) image on a zero canvas with its top-left corner at (rows[b], cols[b]).

    x: (B, C, H, W); rows, cols: (B,) int64 in [0, canvas - H]. One gather, no loops.
    """
    B, C, H, W = x.shape
    r = torch.arange(canvas, device=x.device)
    src_r = r.unsqueeze(0) - rows.unsqueeze(1)  # (B, canvas): source row for each canvas row
    src_c = r.unsqueeze(0) - cols.unsqueeze(1)
    valid = ((src_r >= 0) & (src_r < H)).unsqueeze(2) & ((src_c >= 0) & (src_c < W)).unsqueeze(1)  # (B, S, S)
    flat = (src_r.clamp(0, H - 1) * W).unsqueeze(2) + src_c.clamp(0, W - 1).unsqueeze(1)  # (B, S, S)
    idx = flat.view(B, 1, -1).expand(B, C, -1)
    out = x.reshape(B, C, H * W).gather(2, idx).view(B, C, canvas, canvas)
    return out * valid.unsqueeze(1).to(x.dtype)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by independent integers in [-max_shift, max_shift] px, zero padding (paper: 2)."""
    if max_shift == 0:
        return x
    B, _, H, W = x.shape
    d = torch.randint(-max_shift, max_shift + 1, (2, B), device=x.device, generator=generator)
    padded = F.pad(x, (max_shift,) * 4)  # (B, C, H+2m, W+2m), digit at offset m
    # The window whose top-left is at m - d shows the digit moved by +d.
    return _window(padded, max_shift - d[0], max_shift - d[1], H, W)


def _window(x: Tensor, top: Tensor, left: Tensor, H: int, W: int) -> Tensor:
    """Crop an (H, W) window per image at (top[b], left[b]) with one gather."""
    B, C, Hp, Wp = x.shape
    rows = top.unsqueeze(1) + torch.arange(H, device=x.device)  # (B, H)
    cols = left.unsqueeze(1) + torch.arange(W, device=x.device)  # (B, W)
    flat = (rows * Wp).unsqueeze(2) + cols.unsqueeze(1)  # (B, H, W)
    return x.reshape(B, C, Hp * Wp).gather(2, flat.view(B, 1, -1).expand(B, C, -1)).view(B, C, H, W)


def random_crop(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """An independent random (size, size) window of each image (B, C, H, W), any dtype (the EM
    paper's smallNORB training crops: 32x32 of 48x48)."""
    B, _, H, W = x.shape
    pos = torch.randint(0, min(H, W) - size + 1, (2, B), device=x.device, generator=generator)
    return _window(x, pos[0], pos[1], size, size)


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central (size, size) window of every image (B, C, H, W) (the EM paper's test crop)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def random_canvas(x: Tensor, canvas: int = 40, generator: torch.Generator | None = None) -> Tensor:
    """Place each digit at an independent random integer position on a zero canvas (affNIST: 40)."""
    B, _, H, W = x.shape
    pos = torch.randint(0, canvas - H + 1, (2, B), device=x.device, generator=generator)
    return place(x, canvas, pos[0], pos[1])


def center_canvas(x: Tensor, canvas: int = 40) -> Tensor:
    """Place every digit in the middle of the canvas (the "expanded MNIST" test set)."""
    B, _, H, W = x.shape
    top, left = (canvas - H) // 2, (canvas - W) // 2
    return F.pad(x, (left, canvas - W - left, top, canvas - H - top))
