"""Reader for the released MNIST-C data (Mu & Gilmer 2019, zenodo record 3239543):
``<root>/<corruption>/test_images.npy`` (N, 28, 28, 1) uint8 and ``test_labels.npy`` (N,) labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from capsbench.core.errors import CapsbenchError


def read_npy(path: Path) -> np.ndarray:
    """One .npy array (no pickles), or a one-line CapsbenchError."""
    if not path.is_file():
        raise CapsbenchError(f"MNIST-C file {path} is missing; expected <root>/<corruption>/test_images.npy "
                             "and test_labels.npy as released (mnist_c.zip)")  # fmt: skip
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CapsbenchError(f"MNIST-C file {path} is not a readable .npy array ({type(e).__name__}: {e})") from None


def load_mnist_c(root: str | Path, corruption: str) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) int64 of one released MNIST-C test corruption."""
    folder = Path(root) / corruption
    if not folder.is_dir():
        raise CapsbenchError(f"MNIST-C folder {folder} does not exist; give the unzipped mnist_c folder, which "
                             f"holds one folder per corruption (e.g. {Path(root) / 'shot_noise'})")  # fmt: skip
    images, labels = read_npy(folder / "test_images.npy"), read_npy(folder / "test_labels.npy")
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1):
        raise CapsbenchError(f"{folder / 'test_images.npy'} has shape {images.shape}; expected (N, 28, 28, 1)")
    if images.dtype != np.uint8:
        raise CapsbenchError(f"{folder / 'test_images.npy'} holds {images.dtype}; expected uint8")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CapsbenchError(f"{folder / 'test_labels.npy'} is {labels.dtype} {labels.shape}; expected (N,) integers")
    if len(labels) != len(images):
        raise CapsbenchError(f"MNIST-C {corruption}: {len(images)} images but {len(labels)} labels in {folder}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CapsbenchError(f"{folder / 'test_labels.npy'}: labels must be 0..9, got {labels.min()}..{labels.max()}")
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (N, 1, 28, 28)
    return x, torch.from_numpy(labels.astype(np.int64))
