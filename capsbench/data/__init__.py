"""MNIST data (``load_mnist``) and batched on-device augmentations (``augment``); every registered
dataset, MNIST included, through ``capsbench.data.datasets.load_dataset`` (docs/datasets.md)."""

from capsbench.data import augment
from capsbench.data.mnist import MNIST, cache_dir, fetch_mnist, load_mnist, mnist_info

__all__ = ["MNIST", "augment", "cache_dir", "fetch_mnist", "load_mnist", "mnist_info"]
