"""smallNORB's novel viewpoints (EM paper): the two splits are exactly the paper's sets, the
preprocessing's shapes, the part on tiny format-true smallNORB files with tiny models (its
declared columns, the stop rule, the familiar-match checks), and the claims with their gates."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from capsbench.core.errors import CapsbenchError
from capsbench.data import augment
from capsbench.data.datasets import load_dataset
from capsbench.data.datasets import smallnorb as sn
from capsbench.data.viewpoints import SPLITS, downsample, familiar_mask, viewpoint_split
from capsbench.parts.base import PARTS, RunContext
from capsbench.parts.viewpoints_train import ViewpointsConfig
from capsbench.report.claims import claim_row, load_claims
from capsbench.report.stats import ratio_interval
from capsbench.train.config import TrainConfig
from tests.test_datasets import norb_bytes

TINY_CAPS = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": [32, 64]}  # as a run's meta stores them
PAIRS = [(e, a) for e in range(9) for a in range(0, 36, 2)]  # every (elevation, azimuth) of smallNORB


def info_table(instances: tuple[int, ...]) -> torch.Tensor:
    """(162, 4) int64 info: every (elevation, azimuth) pair once, instances and lightings cycled."""
    rows = [(instances[i % len(instances)], e, a, i % 6) for i, (e, a) in enumerate(PAIRS)]
    return torch.tensor(rows, dtype=torch.int64)


# ---- the splits ------------------------------------------------------------------------------


def test_the_splits_are_exactly_the_papers_sets():
    info = info_table((4, 6, 7, 8, 9))
    az = familiar_mask(info, "azimuth")
    assert {10 * int(a) for a in info[az, 2]} == {300, 320, 340, 0, 20, 40}
    assert {10 * int(a) for a in info[~az, 2]} == set(range(60, 300, 20))  # the other 12 azimuths
    assert int(az.sum()) == 9 * 6 and set(info[az, 1].tolist()) == set(range(9))  # every elevation kept
    el = familiar_mask(info, "elevation")
    assert set(info[el, 1].tolist()) == {0, 1, 2} and set(info[~el, 1].tolist()) == set(range(3, 9))
    assert int(el.sum()) == 3 * 18 and set(info[el, 2].tolist()) == set(range(0, 36, 2))  # every azimuth kept
    with pytest.raises(CapsbenchError, match="unknown viewpoint split 'lighting'"):
        familiar_mask(info, "lighting")


def tiny_norb_dataset(seed: int = 0):
    """A smallNORB-like Dataset in memory: every viewpoint once per split, class k a bright block."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, instances in (("train", (4, 6, 7, 8, 9)), ("test", (0, 1, 2, 3, 5))):
        y = torch.randint(0, 5, (len(PAIRS),), generator=g)
        x = torch.randint(0, 40, (len(PAIRS), 2, 96, 96), generator=g, dtype=torch.uint8)
        for k in range(5):
            x[y == k, :, 24 + 8 * k : 40 + 8 * k, 32:64] = 255
        out[split] = (x, y, info_table(instances))
    return out


def test_a_split_trains_on_training_toys_at_familiar_viewpoints_and_tests_on_test_toys():
    t = tiny_norb_dataset()
    ds = SimpleNamespace(name="smallnorb", train_x=t["train"][0], train_y=t["train"][1], test_x=t["test"][0],
                         test_y=t["test"][1], extra={"train_info": t["train"][2], "test_info": t["test"][2]})  # fmt: skip
    for split in SPLITS:
        v = viewpoint_split(ds, split)
        fam_tr, fam_te = familiar_mask(t["train"][2], split), familiar_mask(t["test"][2], split)
        assert v.train_x.shape == (int(fam_tr.sum()), 2, 48, 48) and v.train_x.dtype == torch.uint8
        assert torch.equal(v.train_y, t["train"][1][fam_tr])
        assert len(v.familiar_x) + len(v.novel_x) == len(PAIRS)  # the test toys' every viewpoint, once
        assert torch.equal(v.familiar_y, t["test"][1][fam_te]) and torch.equal(v.novel_y, t["test"][1][~fam_te])
        assert torch.equal(v.novel_x, downsample(t["test"][0][~fam_te]))
    left = viewpoint_split(ds, "azimuth", channels="left")
    assert left.train_x.shape[1] == 1 and torch.equal(left.train_x[:, 0], viewpoint_split(ds, "azimuth").train_x[:, 0])
    with pytest.raises(CapsbenchError, match="per-image viewpoints"):
        viewpoint_split(SimpleNamespace(name="mnist", extra={}, train_y=ds.train_y, test_y=ds.test_y), "azimuth")


def test_downsampling_averages_2x2_blocks_and_crops_have_the_papers_shapes():
    x = torch.tensor([[0, 2], [4, 6]], dtype=torch.uint8).repeat(48, 48).view(1, 1, 96, 96).repeat(3, 2, 1, 1)
    small = downsample(x)
    assert small.shape == (3, 2, 48, 48) and small.dtype == torch.uint8 and (small == 3).all()
    img = torch.arange(48 * 48, dtype=torch.float32).view(1, 1, 48, 48).repeat(5, 2, 1, 1)
    crops = augment.random_crop(img, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 2, 32, 32)
    for c in crops:  # each crop is a window of the image: its top-left value gives the place
        top, left = divmod(int(c[0, 0, 0]), 48)
        assert top <= 16 and left <= 16 and torch.equal(c, img[0, :, top : top + 32, left : left + 32])
    assert torch.equal(augment.center_crop(img, 32), img[:, :, 8:40, 8:40])
    u8 = augment.random_crop(torch.zeros(2, 1, 48, 48, dtype=torch.uint8), 32)
    assert u8.dtype == torch.uint8 and u8.shape == (2, 1, 32, 32)


# ---- the part on format-true files ----------------------------------------------------------


def write_tiny_norb(folder, seed: int = 0) -> None:
    """The six smallNORB files (uncompressed), written with tiny_norb_dataset's images."""
    folder.mkdir(parents=True, exist_ok=True)
    t = tiny_norb_dataset(seed)
    for split, stem in sn.STEMS.items():
        x, y, info = t[split]
        for kind, a in (("dat", x.numpy()), ("cat", y.numpy().astype(np.int32)), ("info", info.numpy().astype(np.int32))):
            (folder / f"{stem}-{kind}.mat").write_bytes(norb_bytes(a))


def cache_tiny_smallnorb(cache) -> None:
    """Put the tiny smallNORB into the cache folder ``cache`` (for `run viewpoints` in tests)."""
    if not (cache / "smallnorb.pt").exists():
        write_tiny_norb(cache.parent / f"{cache.name}-norb-files")
        load_dataset("smallnorb", cache, cache.parent / f"{cache.name}-norb-files", allow_download=False)


def small_cfg(**over) -> ViewpointsConfig:
    values = {"steps": 4, "eval_every": 2, "batch_size": 8, "test_n": 32, "stop_at": 0.99, "log_every": 2,
              "checkpoint_every": 4, "batch_size_eval": 64}  # fmt: skip
    return dataclasses.replace(ViewpointsConfig(), **{**values, **over})


def viewpoints_case(root):
    """The part's context on tiny format-true smallNORB files, with a tiny CapsNet and the pooled CNN."""
    write_tiny_norb(root / "norb")
    ds = load_dataset("smallnorb", root / "cache", root / "norb", allow_download=False)
    models = {"capsnet": SimpleNamespace(meta={"options": TINY_CAPS}), "cnn-pooled": SimpleNamespace(meta={"options": {}})}
    ctx = RunContext(models=models, test_x=ds.test_x[:0], test_y=ds.test_y[:0], train_cfg=TrainConfig(dataset="smallnorb"),
                     device=torch.device("cpu"), dtype=None, seed=0, progress=False, data=ds,
                     cache_root=str(root / "cache"))  # fmt: skip
    return ctx, small_cfg()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # trains two tiny models per split
def test_the_part_writes_its_columns_stops_at_the_target_and_checks_the_match(tmp_path, one_thread, capsys):
    p = PARTS.get("viewpoints")
    ctx, cfg = viewpoints_case(tmp_path)
    res = p.run(ctx, cfg)
    assert set(res.tables) == set(p.tables)
    for name, df in res.tables.items():
        assert tuple(df.columns) == p.tables[name], name
    df = res.tables["viewpoints"]
    assert len(df) == 2 * 2 * 2  # models x splits x (familiar, novel)
    assert set(df.dataset) == {"smallnorb"} and (df.n == 32).all() and set(df.viewpoints) == {"familiar", "novel"}
    assert (df.steps == 4).all() and not df.reached.any()  # 99% is out of reach in 4 steps: trained every step
    checks = res.tables["viewpoints_checks"]
    assert set(checks.check) == {"familiar-azimuth", "familiar-elevation"} and not checks.passed.any()
    # a target every model meets at once: each stops at the first evaluation, the weights cached there
    easy = small_cfg(stop_at=0.01, steps=6)
    again = p.run(ctx, easy).tables["viewpoints"]
    assert (again.steps == 2).all() and again.reached.all() and not again.from_cache.any()
    assert p.run(ctx, easy).tables["viewpoints"].from_cache.all()  # keyed: the second run is served from the cache


def test_the_part_runs_on_smallnorb_only_and_its_suite_resolves():
    from capsbench.suite import RunRequest, find_suite, read_suite, resolve

    raw = read_suite(find_suite("viewpoints"))
    r = resolve(raw, "viewpoints", RunRequest("viewpoints", preset="smoke", device="cpu"))
    assert r.train.dataset == "smallnorb" and r.parts["viewpoints"].steps == 4
    assert {m: (o["input_size"], o["in_channels"], o["num_classes"]) for m, o in r.models.items()} == {
        "capsnet": (32, 2, 5), "cnn-pooled": (32, 2, 5)}
    with pytest.raises(CapsbenchError, match=r"part viewpoints runs on smallnorb only \(its protocol is built on that data\)"):
        resolve(raw, "viewpoints", RunRequest("viewpoints", preset="smoke", device="cpu", sets=("train.dataset=mnist",)))
    with pytest.raises(CapsbenchError, match="viewpoints.splits must be distinct names of azimuth, elevation"):
        resolve(raw, "viewpoints", RunRequest("viewpoints", preset="smoke", device="cpu",
                                              sets=('viewpoints.splits=["azimuth", "lighting"]',)))  # fmt: skip


# ---- the claims -------------------------------------------------------------------------------


def claim_tables(cap_err: float, cnn_err: float, n: int = 10000, dataset: str = "smallnorb", matched: bool = True):
    rows = [{"model": m, "split": s, "viewpoints": "novel", "error": e, "accuracy": 1 - e, "n": n, "seed": 0,
             "dataset": dataset} for m, e in (("capsnet", cap_err), ("cnn-pooled", cnn_err)) for s in SPLITS]  # fmt: skip
    checks = [{"model": m, "split": s, "check": f"familiar-{s}", "name": f"{s} {m}", "passed": matched, "detail": "",
               "seed": 0} for m in ("capsnet", "cnn-pooled") for s in SPLITS]  # fmt: skip
    return {"viewpoints": pd.DataFrame(rows), "viewpoints_checks": pd.DataFrame(checks)}


def test_the_claims_load_and_measure_the_relative_error_reduction():
    claims = load_claims()
    for split in SPLITS:
        c = claims[f"viewpoints-{split}"]
        assert (c.part, c.table, c.value, c.minus, c.checks) == ("viewpoints", "viewpoints", "error_reduction",
                                                                 "cnn-pooled", (f"familiar-{split}",))  # fmt: skip
        assert c.band == (15.0, 45.0) and any(p.kind == "dataset" and p.params == {"name": "smallnorb"} for p in c.requires)
        row = claim_row(c, claim_tables(0.14, 0.20), "full")
        assert row["measured_mean"] == pytest.approx(30.0) and row["verdict"] == "reproduced", row
        assert 25 < row["ci_low"] < 30 < row["ci_high"] < 35 and "Katz" in row["notes"]
        assert claim_row(c, claim_tables(0.20, 0.20), "full")["verdict"] == "not reproduced"


def test_mnist_data_or_unmatched_familiar_accuracy_make_the_claims_inconclusive():
    c = load_claims()["viewpoints-azimuth"]
    row = claim_row(c, claim_tables(0.14, 0.20, dataset="mnist"), "full")
    assert row["verdict"] == "inconclusive" and "trained on smallnorb: capsnet seed 0 trained on mnist" in row["precondition"]
    row = claim_row(c, claim_tables(0.14, 0.20, matched=False), "full")
    assert row["verdict"] == "inconclusive" and "sanity check failed: azimuth capsnet" in row["precondition"]


def test_error_reduction_needs_a_compared_model_and_the_ratio_interval_is_katz():
    text = ('[a]\nsource="s"\nstatement="x"\npaper_value=30.0\ntolerance=5.0\nunit="u"\nmetric="m"\nprotocol="p"\n'
            'model="capsnet"\noptions={}\npart="viewpoints"\ntable="viewpoints"\nvalue="error_reduction"\nwhere={}\n')  # fmt: skip
    with pytest.raises(CapsbenchError, match="error_reduction needs `minus`"):
        load_claims(text)
    lo, hi = ratio_interval(1400, 10000, 2000, 10000)
    half = 1.959964 * math.sqrt(1 / 1400 - 1 / 10000 + 1 / 2000 - 1 / 10000)
    assert (lo, hi) == (pytest.approx(0.7 * math.exp(-half)), pytest.approx(0.7 * math.exp(half)))
    assert all(math.isfinite(v) for v in ratio_interval(0, 100, 5, 100))  # a zero count stays finite
