"""The novel-viewpoint splits of smallNORB from the EM paper (Hinton, Sabour & Frosst, "Matrix
capsules with EM routing", ICLR 2018, the experiment on generalising to novel viewpoints).

- azimuth: the familiar viewpoints are azimuths 300, 320, 340, 0, 20 and 40 degrees (smallNORB's
  info values 30, 32, 34, 0, 2, 4, in units of 10 degrees); the other 12 azimuths are novel.
- elevation: the familiar viewpoints are the 3 lowest elevations (info 0, 1, 2: 30, 35 and 40
  degrees); the 6 higher ones (45 to 70 degrees) are novel.

Both splits keep smallNORB's official instance split, as the paper did: the models train on the
*training* instances (toys 4, 6, 7, 8, 9) at the familiar viewpoints only, and are tested on the
*test* instances (toys 0, 1, 2, 3, 5) at the familiar viewpoints and, separately, at the novel
ones. The training instances' novel viewpoints are never used. Every lighting is kept. With the
full release each split has 8,100 training images, 8,100 familiar and 16,200 novel test images.

Preprocessing as the paper: 96x96 downsampled to 48x48 (here by 2x2 area averaging, rounded back
to uint8), random 32x32 crops for training and the central 32x32 crop for testing
(``augment.random_crop`` / ``augment.center_crop``). Not done here: the paper's per-image
standardisation (zero mean, unit variance) and its random brightness and contrast, because
capsbench's models take [0, 1] inputs (CapsNet's decoder reconstructs them). The paper does not
say (as far as capsbench's facts file records) whether it used one camera or both: by default
both images of the stereo pair are kept as 2 channels (``channels="both"``); ``"left"`` keeps
channel 0, the left camera, alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from capsbench.core.errors import CapsbenchError

Channels = Literal["both", "left"]
AZIMUTH_FAMILIAR = (30, 32, 34, 0, 2, 4)  # info azimuth x 10 degrees: 300, 320, 340, 0, 20, 40
ELEVATION_FAMILIAR = (0, 1, 2)  # info elevation: 30, 35, 40 degrees (the 3 lowest of 9)
FAMILIAR = {"azimuth": (2, AZIMUTH_FAMILIAR), "elevation": (1, ELEVATION_FAMILIAR)}  # split -> (info column, values)
SPLITS = tuple(FAMILIAR)
DOWNSAMPLED = 48  # the paper's 48x48
CROP = 32  # the paper's 32x32 crops


def familiar_mask(info: Tensor, split: str) -> Tensor:
    """(N,) bool: the images of ``info`` (N, 4: instance, elevation, azimuth, lighting) at the
    split's familiar (training) viewpoints."""
    if split not in FAMILIAR:
        raise CapsbenchError(f"unknown viewpoint split {split!r}; known splits: {', '.join(SPLITS)}")
    column, values = FAMILIAR[split]
    return torch.isin(info[:, column], torch.tensor(values, dtype=info.dtype, device=info.device))


def downsample(x_u8: Tensor, size: int = DOWNSAMPLED, chunk: int = 1024) -> Tensor:
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8 by area averaging (H and W multiples of
    ``size``), rounded; in chunks of ``chunk`` images so the float copy stays small."""
    N, C, H, W = x_u8.shape
    if H % size or W % size:
        raise CapsbenchError(f"cannot downsample {H}x{W} images to {size}x{size} by area averaging")
    out = torch.empty(N, C, size, size, dtype=torch.uint8, device=x_u8.device)
    for i in range(0, N, chunk):
        out[i : i + chunk] = F.avg_pool2d(x_u8[i : i + chunk].float(), (H // size, W // size)).round_().to(torch.uint8)
    return out


def pick_channels(x: Tensor, channels: Channels) -> Tensor:
    """The stereo pair (N, 2, H, W) as it is, or its left camera alone (N, 1, H, W)."""
    if channels not in ("both", "left"):
        raise CapsbenchError(f"channels must be 'both' or 'left', got {channels!r}")
    return x if channels == "both" else x[:, :1]


@dataclass(frozen=True)
class ViewpointSplit:
    """One split's images, uint8 (N, C, 48, 48), and int64 labels (N,)."""

    split: str
    train_x: Tensor  # training instances, familiar viewpoints
    train_y: Tensor
    familiar_x: Tensor  # test instances, familiar viewpoints
    familiar_y: Tensor
    novel_x: Tensor  # test instances, novel viewpoints
    novel_y: Tensor


def viewpoint_split(data: Any, split: str, channels: Channels = "both") -> ViewpointSplit:
    """The EM paper's ``split`` ("azimuth" or "elevation") of a smallNORB ``Dataset`` (its
    ``extra`` train_info / test_info), downsampled to 48x48."""
    extra = getattr(data, "extra", {}) or {}
    if "train_info" not in extra or "test_info" not in extra:
        raise CapsbenchError(f"the novel-viewpoint splits need smallNORB's per-image viewpoints (train_info, "
                             f"test_info); dataset {getattr(data, 'name', '?')} has none")  # fmt: skip
    train = familiar_mask(extra["train_info"].to(data.train_y.device), split)
    test = familiar_mask(extra["test_info"].to(data.test_y.device), split)

    def images(x: Tensor, mask: Tensor) -> Tensor:
        return downsample(pick_channels(x[mask.to(x.device)], channels))

    return ViewpointSplit(split, images(data.train_x, train), data.train_y[train],
                          images(data.test_x, test), data.test_y[test],
                          images(data.test_x, ~test), data.test_y[~test])  # fmt: skip
