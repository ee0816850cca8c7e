"""CIFAR-10 (Krizhevsky 2009): 32x32 colour images, 10 classes, 50k/10k, from the "python version"
release (``cifar-10-python.tar.gz``, extracted to ``cifar-10-batches-py/``).

Each batch file is a pickled dict: ``data`` (10000, 3072) uint8, one row per image, the 1024 red,
then green, then blue values in row-major order, and ``labels`` (10000 ints); ``batches.meta``
holds ``label_names``. The files are pickles, so they are read only with the numpy-only unpickler
(capsbench/data/safe_pickle.py): a file naming any global other than numpy array reconstruction is
refused before anything runs. Keys are bytes (``b"data"``) in the Python 2 release, str in
re-pickled copies; both are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from capsbench.core.errors import CapsbenchError
from capsbench.data.datasets.registry import DatasetSpec, Tensors, register
from capsbench.data.safe_pickle import safe_load_numpy_pickle

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
FILES = "the python-version batches data_batch_1..5, test_batch and batches.meta (cifar-10-batches-py/)"


def unpickle(path: Path) -> dict[str, Any]:
    """One CIFAR batch file as a dict with str keys, through the numpy-only unpickler."""
    if not path.is_file():
        raise CapsbenchError(f"{path} is missing; a CIFAR-10 folder holds {FILES}")
    obj = safe_load_numpy_pickle(path.read_bytes(), what=f"CIFAR-10 file {path}")
    if not isinstance(obj, dict):
        raise CapsbenchError(f"{path} holds a {type(obj).__name__}, not a CIFAR-10 batch dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: Path) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file."""
    d = unpickle(path)
    if "data" not in d or "labels" not in d:
        raise CapsbenchError(f"{path} has no data/labels keys (found {', '.join(map(str, d))}); is it a CIFAR-10 batch?")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise CapsbenchError(f"{path}: data is {data.dtype} {data.shape}; expected (N, 3072) uint8")
    labels = np.asarray(d["labels"])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise CapsbenchError(f"{path}: labels are {labels.dtype} {labels.shape}; expected {len(data)} integers")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
    return x, torch.from_numpy(labels.astype(np.int64))


def check_meta(folder: Path) -> None:
    names = unpickle(folder / "batches.meta").get("label_names")
    names = [n.decode("latin1") if isinstance(n, bytes) else n for n in names or []]
    if tuple(names) != CLASSES:
        raise CapsbenchError(f"{folder / 'batches.meta'} names the classes {names}; CIFAR-10's are {list(CLASSES)}")


def read_cifar10(folder: Path) -> Tensors:
    """The CIFAR-10 batches in ``folder`` (or in its ``cifar-10-batches-py``)."""
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    check_meta(folder)
    train = [read_batch(folder / b) for b in TRAIN_BATCHES]
    test_x, test_y = read_batch(folder / "test_batch")
    return {"train_x": torch.cat([x for x, _ in train]), "train_y": torch.cat([y for _, y in train]),
            "test_x": test_x, "test_y": test_y}  # fmt: skip


def download_cifar10(root: Path) -> Path:
    """torchvision's archive (MD5-checked), extracted; read by ``read_cifar10``, not by torchvision's
    own loader, which would unpickle the files without restrictions."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    return root / CIFAR10.base_folder


register(DatasetSpec(
    "cifar10", "CIFAR-10: 32x32 colour photos of 10 object classes (Krizhevsky 2009)", (3, 32, 32), CLASSES,
    (50000, 10000), FILES, read=read_cifar10, download=download_cifar10,
))  # fmt: skip
