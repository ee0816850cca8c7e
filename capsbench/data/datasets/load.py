"""Loading a registered dataset from the first source that works, like MNIST (capsbench/data/mnist.py):

1. the cache, ``<cache>/<name>.pt`` (tensors with their SHA-256, checked on every read);
2. a folder of the original files the user names (``data fetch NAME --dir DIR``);
3. torchvision's download (torchvision checks its checksums), for users with internet access.

Offline, with neither a cache nor a folder, the error is one line that says both ways to get it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from capsbench.core import atomic
from capsbench.core.errors import CapsbenchError
from capsbench.core.lock import file_lock
from capsbench.data.datasets.registry import DATASETS, SPLITS, Dataset, DatasetSpec, Tensors
from capsbench.data.mnist import cache_dir, tensor_sha256


def cache_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/<name>.pt`` (MNIST's is ``mnist.pt``, as it always was)."""
    return cache_dir(data_dir) / f"{name}.pt"


def check_tensors(spec: DatasetSpec, t: dict[str, Any], what: str) -> None:
    """Shapes, dtypes and labels of a reader's or the cache's tensors, or one CapsbenchError line.
    The number of images is the data's own (small format-true files pass); the image shape is not."""
    for split in SPLITS:
        x, y = t.get(f"{split}_x"), t.get(f"{split}_y")
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != spec.shape:
            got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
            raise CapsbenchError(f"{what}: {split}_x should be (N, {', '.join(map(str, spec.shape))}) uint8, got {got}")
        if not isinstance(y, Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (len(x),):
            got = (tuple(y.shape), y.dtype) if isinstance(y, Tensor) else type(y).__name__
            raise CapsbenchError(f"{what}: {split}_y should be ({len(x)},) int64, got {got}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise CapsbenchError(f"{what}: {split} labels {int(y.min())}..{int(y.max())} outside 0..{spec.num_classes - 1}")
    for k, shape in spec.extra.items():
        e, n = t.get(k), len(t[f"{k.split('_')[0]}_x"])
        if not isinstance(e, Tensor) or tuple(e.shape) != (n, *shape):
            raise CapsbenchError(f"{what}: {k} should be {(n, *shape)}, got {tuple(e.shape) if isinstance(e, Tensor) else e}")


def as_dataset(spec: DatasetSpec, t: Tensors, source: str) -> Dataset:
    return Dataset(spec.name, t["train_x"], t["train_y"], t["test_x"], t["test_y"], spec.classes, source,
                   {k: t[k] for k in spec.extra})  # fmt: skip


# --- 1. the cache ---------------------------------------------------------------------------


def from_cache(spec: DatasetSpec, path: Path) -> Dataset:
    if not path.exists():
        raise FileNotFoundError(f"no {path}")
    fix = f"delete it and run `python -m capsbench data fetch {spec.name}`"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is a corrupt cache
        raise CapsbenchError(f"cache file {path} is corrupt ({type(e).__name__}); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get("sha256"), dict):
        raise CapsbenchError(f"cache file {path} has no checksums; {fix}")
    check_tensors(spec, state, f"cache file {path}")
    for k in (*(f"{s}_{v}" for s in SPLITS for v in "xy"), *spec.extra):
        if tensor_sha256(state[k]) != state["sha256"].get(k):
            raise CapsbenchError(f"cache file {path} fails its checksum ({k}); {fix}")
    return as_dataset(spec, state, str(state.get("source", "cache")))


def write_cache(path: Path, ds: Dataset) -> None:
    state: dict[str, Any] = {**ds.tensors(), "source": ds.source}
    state["sha256"] = {k: tensor_sha256(t) for k, t in ds.tensors().items()}
    atomic.write_with(path, lambda tmp: torch.save(state, tmp))


# --- 2. and 3. the original files, from the user's folder or torchvision -----------------------


def from_folder(spec: DatasetSpec, folder: Path, source: str) -> Dataset:
    """The original files in ``folder``, checked; a release of another size is read with a warning."""
    if spec.read is None:
        raise CapsbenchError(f"{spec.name} has no reader of its original files")
    if not folder.is_dir():
        raise CapsbenchError(f"--dir {folder} is not a folder; it should hold {spec.files}")
    t = spec.read(folder)
    check_tensors(spec, t, f"{spec.name} files in {folder}")
    got = (len(t["train_x"]), len(t["test_x"]))
    if got != spec.sizes:
        print(f"warning: {spec.name} in {folder} has {got[0]} training and {got[1]} test images; the release has "
              f"{spec.sizes[0]} and {spec.sizes[1]}", file=sys.stderr)  # fmt: skip
    return as_dataset(spec, t, source)


def from_download(spec: DatasetSpec, root: Path) -> Dataset:
    """torchvision's download of ``spec``. torchvision prints its URLs and failed attempts to
    stdout; they are kept off the command's output (a failure ends in the caller's one line)."""
    if spec.download is None:
        raise CapsbenchError(f"torchvision does not distribute {spec.name}")
    with contextlib.redirect_stdout(io.StringIO()):
        folder = spec.download(root / "torchvision")
    return from_folder(spec, folder, "torchvision")


# --- the public API -------------------------------------------------------------------------


def not_cached(spec: DatasetSpec, why: str = "") -> CapsbenchError:
    """The one line for a dataset that is not in the cache: how to fetch it (a download only where
    torchvision distributes it)."""
    files = f"`python -m capsbench data fetch {spec.name} --dir DIR` with its original files ({spec.files})"
    how = (f"run `python -m capsbench data fetch {spec.name}` with internet access, or {files}" if spec.download
           else f"download its files yourself (torchvision does not distribute {spec.name}; see docs/datasets.md) "
                f"and run {files}")  # fmt: skip
    return CapsbenchError(f"{spec.name} is not cached{f' ({why})' if why else ''}: {how}")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                 allow_download: bool = True) -> Dataset:  # fmt: skip
    """Dataset ``name`` from the cache, else from ``folder`` (its original files), else torchvision's
    download; fills the cache. Unknown names are refused with the known ones."""
    spec = DATASETS.get(name)
    if spec.load is not None:
        return spec.load(data_dir, folder, allow_download)
    path = cache_path(name, data_dir)
    try:
        return from_cache(spec, path)
    except (FileNotFoundError, CapsbenchError):  # absent or corrupt: decided under the lock
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_suffix(".lock")):
        problem = ""
        try:  # another process may have filled the cache while we waited
            return from_cache(spec, path)
        except FileNotFoundError:
            pass
        except CapsbenchError as e:  # a corrupt or tampered cache: refetched, or refused
            problem = str(e)
        if folder is not None:  # the user said where the files are: their errors are the answer
            ds = from_folder(spec, Path(folder).expanduser(), f"{spec.name} files: {folder}")
        elif allow_download and spec.download is not None:
            try:
                ds = from_download(spec, path.parent)
            except Exception as e:  # offline, a refused mirror, a bad checksum: one line either way
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise not_cached(spec, f"{problem + '; ' if problem else ''}torchvision download: {first}") from None
        elif problem:
            raise CapsbenchError(problem)
        else:
            raise not_cached(spec)
        write_cache(path, ds)
        return ds


def fetch_dataset(name: str, data_dir: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                  allow_download: bool = True) -> Dataset:  # fmt: skip
    """Make sure the cache is filled (same sources as :func:`load_dataset`)."""
    return load_dataset(name, data_dir, folder, allow_download)


def dataset_rows(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per registered dataset for `list datasets`: shape, classes, splits, where cached.
    Reads nothing but the cache folder's listing."""
    rows = []
    for name in DATASETS.names():
        spec, path = DATASETS.get(name), cache_path(name, data_dir)
        rows.append({"dataset": name, "shape": "x".join(map(str, spec.shape)), "classes": spec.num_classes,
                     "splits": f"train {spec.sizes[0]:,} / test {spec.sizes[1]:,}",
                     "cached": str(path) if path.exists() else "not cached", "about": spec.about})  # fmt: skip
    return rows
