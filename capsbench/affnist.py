"""Reader for the real affNIST test set (Tieleman, 2013): Matlab .mat files of 40x40 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from capsbench.errors import CapsbenchError


def load_affnist(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images (N, 40, 40) uint8 and labels (N,) int64 from one .mat file or a folder of them.

    Each file holds the struct ``affNISTdata`` with ``image`` (1600 x N uint8, one image per
    column) and ``label_int`` (N). A column is read in row-major order (``reshape(40, 40)``),
    the layout of files written from NumPy; this has been checked on generated files only.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        raise CapsbenchError("reading affNIST needs scipy: pip install scipy (or pip install capsbench[affnist])") from None
    path = Path(path)
    files = sorted(path.glob("*.mat"), key=_natural) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise CapsbenchError(f"affNIST path {path} does not exist or holds no .mat files")
    xs, ys = [], []
    for f in files:
        x, y = _read_one(loadmat, f)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _natural(p: Path) -> tuple:
    return (int(p.stem),) if p.stem.isdigit() else (float("inf"), p.stem)


def _read_one(loadmat, f: Path) -> tuple[Tensor, Tensor]:
    try:
        mat = loadmat(str(f), struct_as_record=False, squeeze_me=True)
    except Exception as e:  # scipy raises several types for non-.mat input
        raise CapsbenchError(f"{f} is not a readable .mat file ({type(e).__name__}: {e})") from None
    data = mat.get("affNISTdata")
    if data is None or not hasattr(data, "image") or not hasattr(data, "label_int"):
        raise CapsbenchError(f"{f} has no affNISTdata struct with fields image and label_int")
    img = np.asarray(data.image)
    labels = np.atleast_1d(np.asarray(data.label_int)).astype(np.int64)
    if img.ndim == 1:
        img = img[:, None]
    if img.shape[0] != 1600 or img.shape[1] != labels.shape[0]:
        raise CapsbenchError(f"{f}: image should be 1600 x N with N labels, got {img.shape} and {labels.shape[0]} labels")
    if img.min() < 0 or img.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise CapsbenchError(f"{f}: pixel values must be in 0..255 and labels in 0..9")
    x = torch.from_numpy(np.ascontiguousarray(img.T.reshape(-1, 40, 40)).astype(np.uint8))
    return x, torch.from_numpy(labels)
