"""MultiMNIST (Sabour et al. 2017, section 6): two digits of different classes, each shifted by up
to 4 px in each direction, overlaid on a 36x36 canvas. Batched on the device, deterministic for
a seed, one gather per digit.

Overlay: pixel-wise maximum by default (``combine="max"``); ``combine="sum"`` adds the two
images and clips to 1. The paper says the digits are "overlaid"; capsbench defaults to the
maximum so that a pixel never gets brighter than either digit made it, and records the choice.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from capsbench.data.augment import place, to_float

Combine = Literal["max", "sum"]
COMBINES = get_args(Combine)


def multimnist(x_u8: Tensor, y: Tensor, n: int, seed: int, max_shift: int = 4, combine: str = "max",
               layers: bool = False) -> tuple[Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """``n`` MultiMNIST images from the digits ``x_u8`` (N, 28, 28) uint8 with labels ``y`` (N,).

    Returns images (n, 1, 28 + 2 * max_shift, same) float in [0, 1], labels (n, 2) int64 (first
    and second digit, always different classes) and the parameters: ``index`` (n, 2) source
    digits and ``shift`` (n, 2, 2) per-digit (row, col) shifts in [-max_shift, max_shift]; with
    ``layers=True`` also ``layers`` (n, 2, 1, S, S), each digit alone on the canvas (the per-digit
    reconstruction targets). Works on the device of ``x_u8``; the same (data, n, seed) give the
    same images on every device. ``y`` on the CPU avoids a device-to-host copy per call.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if max_shift < 0 or n < 0:
        raise ValueError("max_shift and n must be >= 0")
    if int(y.unique().numel()) < 2:
        raise ValueError("MultiMNIST needs digits of at least two classes")
    device, N = x_u8.device, len(x_u8)
    g = torch.Generator().manual_seed(seed)  # CPU draws: identical on every device
    first = torch.randint(0, N, (n,), generator=g)
    # The second digit: a uniform pick among digits of another class (rejection, vectorised).
    second = torch.randint(0, N, (n,), generator=g)
    y_cpu = y.cpu()
    clash = y_cpu[second] == y_cpu[first]
    while bool(clash.any()):
        second[clash] = torch.randint(0, N, (int(clash.sum()),), generator=g)
        clash = y_cpu[second] == y_cpu[first]
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2, 2), generator=g)  # (n, digit, row/col)
    index = torch.stack([first, second], 1)
    size = x_u8.shape[-1] + 2 * max_shift
    placed = []
    for k in range(2):
        digits = to_float(x_u8[index[:, k].to(device)])  # (n, 1, 28, 28)
        top = (max_shift + shift[:, k]).to(device)  # top-left corner on the canvas
        placed.append(place(digits, size, top[:, 0], top[:, 1]))
    images = torch.maximum(*placed) if combine == "max" else (placed[0] + placed[1]).clamp_(0, 1)
    labels = y_cpu[index].to(device)
    params = {"index": index, "shift": shift}
    if layers:
        params["layers"] = torch.stack(placed, 1)  # (n, 2, 1, S, S)
    return images, labels, params


def two_digit_error(scores: Tensor, labels: Tensor) -> Tensor:
    """Per-image error (n,) bool: the two highest-scoring classes are not exactly the two labels
    (the paper's MultiMNIST error, "either digit wrong")."""
    top2 = scores.topk(2, dim=1).indices.sort(dim=1).values
    return (top2 != labels.sort(dim=1).values).any(dim=1)
