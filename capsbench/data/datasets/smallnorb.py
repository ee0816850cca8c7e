"""smallNORB (LeCun, Huang & Bottou 2004): 96x96 grey stereo photos of 50 toys in 5 categories
(animal, human, airplane, truck, car) under 6 lightings, 9 elevations and 18 azimuths; 24,300
stereo pairs per split, training toys (instances) 4, 6, 7, 8, 9 and test toys 0, 1, 2, 3, 5.

Images are kept as the stereo pairs: (N, 2, 96, 96) uint8, channel 0 the left camera, channel 1
the right, so a model sees both (in_channels = 2); a protocol that wants one view takes channel 0.
The viewpoint of every image is kept as ``extra["train_info"]`` / ``extra["test_info"]``, (N, 4)
int64 columns instance (0-9), elevation (0-8: 30 to 70 degrees in steps of 5), azimuth (0, 2, ...,
34: times 10 degrees) and lighting (0-5), for the novel-viewpoint protocol.

The files (``smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat`` and
``smallnorb-5x01235x9x58x6x2x96x96-testing-{dat,cat,info}.mat``, gzipped or not) are not MATLAB
files but NORB's binary matrices: little-endian int32 magic (0x1E3D4C55 uint8 data, 0x1E3D4C54
int32 data), int32 ndim, then max(3, ndim) int32 dimensions (those past ndim are 1 and ignored),
then the data. torchvision does not distribute smallNORB: fetch the six files from
https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/ and pass their folder.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from capsbench.core.errors import CapsbenchError
from capsbench.data.datasets.registry import DatasetSpec, Tensors, register

MAGIC = {0x1E3D4C55: np.dtype("u1"), 0x1E3D4C54: np.dtype("<i4")}  # the two types smallNORB uses
STEMS = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training", "test": "smallnorb-5x01235x9x58x6x2x96x96-testing"}
CLASSES = ("animal", "human", "airplane", "truck", "car")
INFO_COLUMNS = ("instance", "elevation", "azimuth", "lighting")
INFO_RANGES = ((0, 9), (0, 8), (0, 34), (0, 5))  # inclusive; azimuths are even
FILES = "the six smallnorb-...-{training,testing}-{dat,cat,info}.mat files (.gz or not)"


def read_norb(path: Path) -> np.ndarray:
    """One NORB binary matrix (uint8 or int32) with its header's shape."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 20:
        raise CapsbenchError(f"{path} is truncated ({len(raw)} bytes): too short for a NORB header")
    magic, ndim = struct.unpack("<Ii", raw[:8])
    if magic not in MAGIC:
        raise CapsbenchError(f"{path} is not a smallNORB uint8/int32 matrix (magic {magic:#x}; expected 0x1e3d4c55 or 0x1e3d4c54)")
    if not 1 <= ndim <= 8:
        raise CapsbenchError(f"{path}: header says {ndim} dimensions")
    stored = max(3, ndim)  # NORB always stores at least 3 dimensions
    start = 8 + 4 * stored
    dims = struct.unpack(f"<{stored}i", raw[8:start])[:ndim]
    dtype = MAGIC[magic]
    body = memoryview(raw)[start:]
    if min(dims) < 0 or len(body) != math.prod(dims) * dtype.itemsize:
        raise CapsbenchError(f"{path} is truncated or padded: {len(body)} data bytes, header says {dims} x {dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def norb_file(folder: Path, stem: str, kind: str) -> Path:
    name = f"{stem}-{kind}.mat"
    path = next((p for p in (folder / name, folder / f"{name}.gz") if p.exists()), None)
    if path is None:
        raise CapsbenchError(f"{folder} has no {name}[.gz]; a smallNORB folder holds {FILES}")
    return path


def read_split(folder: Path, stem: str) -> tuple[Tensor, Tensor, Tensor]:
    """Images (N, 2, 96, 96) uint8, categories (N,) int64 and info (N, 4) int64 of one split."""
    dat, cat, info = (norb_file(folder, stem, k) for k in ("dat", "cat", "info"))
    x, y, meta = read_norb(dat), read_norb(cat), read_norb(info)
    if x.dtype != np.uint8 or x.shape[1:] != (2, 96, 96):
        raise CapsbenchError(f"{dat}: {x.dtype} {x.shape}; expected (N, 2, 96, 96) uint8 stereo pairs")
    if y.dtype.kind != "i" or y.shape != (len(x),):
        raise CapsbenchError(f"{cat}: {y.dtype} {y.shape}; expected ({len(x)},) int32 categories")
    if meta.dtype.kind != "i" or meta.shape != (len(x), 4):
        raise CapsbenchError(f"{info}: {meta.dtype} {meta.shape}; expected ({len(x)}, 4) int32 (instance, elevation, azimuth, lighting)")
    for j, (col, (lo, hi)) in enumerate(zip(INFO_COLUMNS, INFO_RANGES)):
        if len(meta) and (meta[:, j].min() < lo or meta[:, j].max() > hi):
            raise CapsbenchError(f"{info}: {col} values {meta[:, j].min()}..{meta[:, j].max()} outside {lo}..{hi}")
    if len(meta) and np.any(meta[:, 2] % 2):
        raise CapsbenchError(f"{info}: odd azimuths; smallNORB's are 0, 2, ..., 34 (x 10 degrees)")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(meta.astype(np.int64))


def read_smallnorb(folder: Path) -> Tensors:
    out = {}
    for split, stem in STEMS.items():
        out[f"{split}_x"], out[f"{split}_y"], out[f"{split}_info"] = read_split(folder, stem)
    return out


register(DatasetSpec(
    "smallnorb", "smallNORB: 96x96 grey stereo pairs of 50 toys in 5 categories, with their viewpoints (LeCun et al. 2004)",
    (2, 96, 96), CLASSES, (24300, 24300), FILES, read=read_smallnorb,
    extra={"train_info": (4,), "test_info": (4,)},
))  # fmt: skip
