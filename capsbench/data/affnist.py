"""Reader for the real affNIST test set (Tieleman, 2013): Matlab .mat files of 40x40 images.

Orientation: each column of ``image`` (1600 values) is read in row-major order,
``image[:, i].reshape(40, 40)`` with no transpose. That is how the public Python loaders read
the files (the Kaggle repackaging notebook that displays them, and scripts that train on
upright MNIST and test on affNIST with exactly this reshape); it could not be checked on the
real files here. The affine part checks it on the data: it reports each model's accuracy on
the first affNIST images as read and transposed, and flags the case where transposed wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from capsbench.core.errors import CapsbenchError

SIDE = 40


def load_affnist(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images (N, 40, 40) uint8 and labels (N,) int64 from one .mat file or a folder of them.

    A folder's ``*.mat`` files (e.g. ``test_batches/1.mat ... 32.mat``) are read in numeric
    order and concatenated. Each file holds the struct ``affNISTdata`` with ``image`` (1600 x N
    uint8, one image per column) and ``label_int`` (N); other fields are ignored.
    """
    try:
        from scipy.io import loadmat
    except ImportError:
        msg = "reading affNIST needs scipy: pip install scipy (or pip install capsbench[affnist])"
        raise CapsbenchError(msg) from None
    files = mat_files(Path(path))
    parts = [_read_one(loadmat, f) for f in files]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def mat_files(path: Path) -> list[Path]:
    """The .mat files at ``path`` (a file, or a folder's ``*.mat`` in numeric order)."""
    if not path.exists():
        raise CapsbenchError(f"affNIST path {path} does not exist; give a .mat file (e.g. test.mat) or a folder")
    if path.is_dir():
        files = sorted(path.glob("*.mat"), key=_natural)
        if not files:
            raise CapsbenchError(f"affNIST folder {path} holds no .mat files; expected 1.mat ... 32.mat or test.mat")
        return files
    if path.suffix.lower() != ".mat":
        raise CapsbenchError(f"affNIST path {path} is not a .mat file; expected e.g. test.mat or a folder of them")
    return [path]


def _natural(p: Path) -> tuple:
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)


def _read_one(loadmat: Callable[..., dict[str, Any]], f: Path) -> tuple[Tensor, Tensor]:
    try:
        mat = loadmat(str(f), struct_as_record=False, squeeze_me=True)
    except Exception as e:  # scipy raises several types for non-.mat input
        raise CapsbenchError(f"{f} is not a readable .mat file ({type(e).__name__}: {e})") from None
    data = mat.get("affNISTdata")
    if data is None or not hasattr(data, "image") or not hasattr(data, "label_int"):
        raise CapsbenchError(f"{f} has no affNISTdata struct with fields image and label_int; is it an affNIST file?")
    img = np.asarray(data.image)
    labels = np.atleast_1d(np.asarray(data.label_int))
    img = img[:, None] if img.ndim == 1 else img  # squeeze_me turns a single image into a vector
    if img.ndim != 2 or img.shape[0] != SIDE * SIDE or labels.ndim != 1 or img.shape[1] != labels.shape[0]:
        raise CapsbenchError(
            f"{f}: affNISTdata.image should be 1600 x N with N labels in label_int, "
            f"got image {img.shape} and label_int {labels.shape}"
        )
    if img.size and (img.min() < 0 or img.max() > 255) or labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CapsbenchError(f"{f}: pixel values must be in 0..255 and labels in 0..9")
    x = np.ascontiguousarray(img.T).reshape(-1, SIDE, SIDE).astype(np.uint8)  # row-major per column (see above)
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
