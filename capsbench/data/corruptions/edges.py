"""The canny_edges corruption of MNIST-C (Mu & Gilmer 2019): the image replaced by its Canny edge
map, as scikit-image's ``feature.canny(x)`` (sigma 1, thresholds 0.1 / 0.2) of the 2019 releases:
masked Gaussian smoothing, Sobel, non-maximum suppression with interpolated neighbours in four
direction sectors, hysteresis by 8-connected components (here: iterated 3x3 dilation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from capsbench.data.corruptions.filters import gaussian_blur, sobel
from capsbench.data.corruptions.registry import corruption

CANNY_SIGMA, CANNY_LOW, CANNY_HIGH = 1.0, 0.1, 0.2
HYSTERESIS_CHECK = 8  # dilation steps between convergence checks (one host sync each)


def smooth(x: Tensor) -> Tensor:
    """skimage's ``smooth_with_function_and_mask``: a zero-padded blur divided by the blurred all-ones
    mask, so the edges are not darkened."""
    bleed = gaussian_blur(torch.ones_like(x[:1]), CANNY_SIGMA, mode="constant")  # (1, 1, H, W)
    return gaussian_blur(x, CANNY_SIGMA, mode="constant") / (bleed + torch.finfo(x.dtype).eps)


def shifted(m: Tensor, dr: int, dc: int) -> Tensor:
    """m[i + dr, j + dc] at (i, j) for (B, 1, H, W); zero outside (only read inside the eroded mask)."""
    p = F.pad(m, (1, 1, 1, 1))
    H, W = m.shape[-2:]
    return p[..., 1 + dr : 1 + dr + H, 1 + dc : 1 + dc + W]


def sector_maxima(mag: Tensor, w: Tensor, plus: tuple, minus: tuple) -> Tensor:
    """Is ``mag`` at least each side's interpolation c2 w + c1 (1 - w); plus/minus = ((dr1, dc1), (dr2, dc2))
    are the offsets of c1 and c2."""
    (p1, p2), (m1, m2) = plus, minus
    ok_plus = shifted(mag, *p2) * w + shifted(mag, *p1) * (1 - w) <= mag
    ok_minus = shifted(mag, *m2) * w + shifted(mag, *m1) * (1 - w) <= mag
    return ok_plus & ok_minus


def non_max_suppression(gr: Tensor, gc: Tensor, mag: Tensor, mask: Tensor) -> Tensor:
    """skimage's four sectors in its order, a later sector overwriting an earlier one on shared
    boundaries (|gr| == |gc|, or a zero component). gr = d/drow (isobel), gc = d/dcol (jsobel)."""
    ar, ac = gr.abs(), gc.abs()
    w_r = ac / torch.where(ar > 0, ar, torch.ones_like(ar))  # |jsobel| / |isobel|
    w_c = ar / torch.where(ac > 0, ac, torch.ones_like(ac))  # |isobel| / |jsobel|
    same = ((gr >= 0) & (gc >= 0)) | ((gr <= 0) & (gc <= 0))
    opposite = ((gr <= 0) & (gc >= 0)) | ((gr >= 0) & (gc <= 0))
    sectors = [  # (points, weight, c_plus offsets (c1, c2), c_minus offsets (c1, c2))
        (same & (ar >= ac), w_r, ((1, 0), (1, 1)), ((-1, 0), (-1, -1))),  # 0-45 degrees
        (same & (ar <= ac), w_c, ((0, 1), (1, 1)), ((0, -1), (-1, -1))),  # 45-90
        (opposite & (ar <= ac), w_c, ((0, 1), (-1, 1)), ((0, -1), (1, -1))),  # 90-135
        (opposite & (ar >= ac), w_r, ((-1, 0), (-1, 1)), ((1, 0), (1, -1))),  # 135-180
    ]
    maxima = torch.zeros_like(mask)
    for pts, w, plus, minus in sectors:
        pts = pts & mask
        maxima = torch.where(pts, sector_maxima(mag, w, plus, minus), maxima)
    return maxima


def hysteresis(strong: Tensor, weak: Tensor) -> Tensor:
    """The 8-connected components of ``weak`` (B, 1, H, W) bool that hold a ``strong`` pixel: grow
    the strong set by 3x3 dilation inside ``weak`` until it stops changing."""
    cur = strong & weak
    while True:
        before = cur
        for _ in range(HYSTERESIS_CHECK):
            cur = (F.max_pool2d(cur.float(), 3, stride=1, padding=1) > 0) & weak
        if torch.equal(cur, before):
            return cur


def canny(x: Tensor) -> Tensor:
    """(B, 1, H, W) bool Canny edges of images in [0, 1] (skimage defaults: sigma 1, low 0.1, high 0.2)."""
    gr, gc = sobel(smooth(x))
    mag = torch.hypot(gr, gc)
    border = torch.zeros_like(x, dtype=torch.bool)
    border[..., 1:-1, 1:-1] = True  # binary_erosion of the all-ones mask with border_value 0
    maxima = non_max_suppression(gr, gc, mag, border & (mag > 0))
    return hysteresis(maxima & (mag >= CANNY_HIGH), maxima & (mag >= CANNY_LOW))


@corruption("canny_edges", "Canny edge map (skimage defaults: sigma 1, thresholds 0.1 / 0.2)")
def canny_edges(x: Tensor, seed: int, start: int) -> Tensor:
    return canny(x).to(x.dtype)
