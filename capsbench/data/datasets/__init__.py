"""Datasets as data: ``load_dataset(name)`` gives uint8 images (N, C, H, W), int64 labels, the class
names and their number, from the cache, a folder of the original files, or torchvision's download.

One module per file format registers its datasets in ``DATASETS`` (registry.py): ``idx`` (mnist,
fashion-mnist, kmnist), ``cifar`` (cifar10), ``svhn`` and ``smallnorb``. docs/datasets.md says
where each comes from and how to fetch it.
"""

from __future__ import annotations

from capsbench.data.datasets import cifar, idx, smallnorb, svhn  # noqa: F401 (they register)
from capsbench.data.datasets.load import cache_path, dataset_rows, fetch_dataset, load_dataset
from capsbench.data.datasets.registry import DATASETS, Dataset, DatasetSpec

__all__ = ["DATASETS", "Dataset", "DatasetSpec", "cache_path", "dataset_rows", "fetch_dataset", "load_dataset"]
