"""SVHN (Netzer et al. 2011), the cropped-digits release ("format 2"): 32x32 colour house-number
digits, 10 classes, 73,257 training and 26,032 test images (the 531k ``extra_32x32.mat`` is not used).

``train_32x32.mat`` / ``test_32x32.mat`` are MATLAB files with ``X`` (32, 32, 3, N) uint8 and
``y`` (N, 1) in 1..10, where 10 means the digit 0 (here: label 0). Reading them needs scipy
(``pip install scipy``, or ``pip install capsbench[svhn]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from capsbench.core.errors import CapsbenchError
from capsbench.data.datasets.registry import DatasetSpec, Tensors, register

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
DIGITS = tuple(str(k) for k in range(10))


def read_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0..9 of one SVHN .mat file."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise CapsbenchError("reading SVHN needs scipy: pip install scipy (or pip install capsbench[svhn])") from None
    if not path.is_file():
        raise CapsbenchError(f"{path} is missing; an SVHN folder holds {' and '.join(FILES.values())}")
    try:
        mat = loadmat(str(path))
    except Exception as e:  # scipy raises several types for non-.mat input
        raise CapsbenchError(f"{path} is not a readable .mat file ({type(e).__name__}: {e})") from None
    X, y = mat.get("X"), mat.get("y")
    if not isinstance(X, np.ndarray) or X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        got = f"{X.dtype} {X.shape}" if isinstance(X, np.ndarray) else "none"
        raise CapsbenchError(f"{path}: X is {got}; expected (32, 32, 3, N) uint8")
    if not isinstance(y, np.ndarray) or y.size != X.shape[3]:
        raise CapsbenchError(f"{path}: y has {getattr(y, 'size', 0)} labels for {X.shape[3]} images")
    labels = y.reshape(-1)
    if labels.size and (labels.min() < 1 or labels.max() > 10 or not np.all(labels == np.round(labels))):
        raise CapsbenchError(f"{path}: labels must be integers 1..10 (10 = the digit 0), got {labels.min()}..{labels.max()}")
    labels = labels.astype(np.int64) % 10  # SVHN's 10 is the digit 0
    x = torch.from_numpy(np.ascontiguousarray(X.transpose(3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)
    return x, torch.from_numpy(labels)


def read_svhn(folder: Path) -> Tensors:
    out = {}
    for split, name in FILES.items():
        out[f"{split}_x"], out[f"{split}_y"] = read_mat(folder / name)
    return out


def download_svhn(root: Path) -> Path:
    """The two .mat files from torchvision's URLs, MD5-checked by torchvision."""
    from torchvision.datasets import SVHN
    from torchvision.datasets.utils import download_url

    for split in FILES:
        url, filename, md5 = SVHN.split_list[split]
        download_url(url, str(root), filename, md5)
    return root


register(DatasetSpec(
    "svhn", "Street View House Numbers: 32x32 colour crops of digits 0-9 (Netzer et al. 2011)", (3, 32, 32), DIGITS,
    (73257, 26032), " and ".join(FILES.values()) + " (the cropped-digits release)", read=read_svhn,
    download=download_svhn,
))  # fmt: skip
