"""The MNIST-C corruptions (Mu & Gilmer 2019) in torch: exact ones exact, shapes and ranges,
seeding independent of the batch, statistical properties; the filters against scipy; the
released-data reader; the corruptions part on a fake context and end to end on smoke."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from capsbench.core.config import from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.data.corruptions import CORRUPTIONS, NAMES, corrupt
from capsbench.data.corruptions.blur import motion_kernels
from capsbench.data.corruptions.edges import canny, hysteresis
from capsbench.data.corruptions.filters import gaussian_blur, sobel, warp
from capsbench.data.corruptions.geometric import rotate_by, shear_by, shift_by
from capsbench.data.corruptions.overlays import line_from_points, zigzag_points
from capsbench.data.mnist_c import load_mnist_c
from capsbench.parts.base import PARTS
from capsbench.parts.corruptions import COLUMNS, CorruptionsConfig, run_corruptions

RANDOM = ("shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "rotate", "translate", "fog",
          "spatter", "dotted_line", "zigzag")  # fmt: skip


def digits(n=8, seed=0):
    """(n, 1, 28, 28) blobs in the middle of the frame (zero border of 6 px), values in [0.2, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    x[..., 6:22, 9:19] = 0.2 + 0.8 * torch.rand(n, 1, 16, 10, generator=g)
    return x


# ---------------------------------------------------------------- the registry, shapes, seeding


def test_the_fifteen_are_registered_with_a_description():
    assert len(NAMES) == 15 and sorted(NAMES) == CORRUPTIONS.names()
    assert all(CORRUPTIONS.meta(n)["about"] for n in NAMES)
    with pytest.raises(CapsbenchError, match="known corruptions"):
        corrupt("frost", digits(), 0)


@pytest.mark.parametrize("name", NAMES)
def test_every_corruption_keeps_shape_range_and_is_finite(name):
    x = torch.cat([digits(4), torch.rand(2, 1, 28, 28), torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)])
    y = corrupt(name, x, seed=3)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all() and y.min() >= 0 and y.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_a_seed_gives_the_same_images_at_any_batch_size(name):
    x = digits(8)
    whole = corrupt(name, x, seed=5)
    parts = torch.cat([corrupt(name, x[:3], seed=5, start=0), corrupt(name, x[3:], seed=5, start=3)])
    assert torch.equal(whole, parts)  # on the CPU; a GPU may pick other conv algorithms per batch size


@pytest.mark.parametrize("name", RANDOM)
def test_different_seeds_give_different_images(name):
    x = digits(4)
    assert not torch.equal(corrupt(name, x, seed=0), corrupt(name, x, seed=1))


def test_an_images_draws_depend_on_its_index_not_its_position_in_the_batch():
    x = digits(1).expand(4, 1, 28, 28)
    y = corrupt("impulse_noise", x, seed=0, start=10)
    assert torch.equal(y[2:3], corrupt("impulse_noise", x[:1], seed=0, start=12))
    assert not torch.equal(y[0], y[1])  # the same digit at two indices gets different noise


# ---------------------------------------------------------------- the exact corruptions


def test_brightness_is_x_plus_half_clipped():
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(corrupt("brightness", x, 0), (x + 0.5).clamp(0, 1))


def test_stripe_inverts_exactly_columns_0_to_6_and_21_to_27():
    x = torch.rand(4, 1, 28, 28)
    y = corrupt("stripe", x, 0)
    inverted = torch.zeros(28, dtype=torch.bool)
    inverted[:7] = inverted[21:] = True
    assert torch.equal(y[..., inverted], 1 - x[..., inverted])
    assert torch.equal(y[..., ~inverted], x[..., ~inverted])


def test_translate_shifts_by_three_whole_pixels_on_both_axes():
    x = digits(8)
    y = corrupt("translate", x, seed=0)
    for b in range(8):
        hits = [(dr, dc) for dr in (-3, 3) for dc in (-3, 3) if torch.equal(y[b], torch.roll(x[b], (dr, dc), (1, 2)))]
        assert len(hits) == 1, b  # the digit sits 6 px from every edge: a roll is a zero-filled shift
    assert len({tuple(s) for s in torch.stack([y[b].nonzero()[0] for b in range(8)]).tolist()}) > 1


def test_shift_by_fills_zeros_and_keeps_the_rest():
    x = torch.rand(1, 1, 28, 28)
    y = shift_by(x, torch.tensor([2.0]), torch.tensor([-1.0]))  # output (c, r) reads input (c + 2, r - 1)
    assert torch.equal(y[0, 0, 1:, :26], x[0, 0, :27, 2:])
    assert (y[0, 0, 0] == 0).all() and (y[0, 0, :, 26:] == 0).all()


def test_scale_shrinks_about_the_centre():
    x = torch.zeros(1, 1, 28, 28)
    x[..., 4:24, 4:24] = 1.0
    y = corrupt("scale", x, 0)
    assert y.sum().item() == pytest.approx(x.sum().item() * 0.49, rel=0.05)  # 70% of each side
    assert torch.allclose(y, y.flip(-1), atol=1e-5) and torch.allclose(y, y.flip(-2), atol=1e-5)  # centred


# ---------------------------------------------------------------- statistics and inverses


def test_shot_noise_keeps_the_mean_of_a_constant_image():
    x = torch.full((16, 1, 28, 28), 0.2)
    y = corrupt("shot_noise", x, seed=0)  # counts ~ Poisson(0.6) / 3: values 0, 1/3, 2/3, 1
    assert y.mean().item() == pytest.approx(0.2, abs=0.01)
    assert set(torch.unique(y * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert corrupt("shot_noise", torch.zeros(2, 1, 28, 28), 0).sum() == 0  # no light, no photons


def test_impulse_noise_flips_about_17_percent_half_salt_half_pepper():
    x = torch.full((16, 1, 28, 28), 0.5)
    y = corrupt("impulse_noise", x, seed=0)
    flipped = (y != 0.5).float().mean().item()
    assert flipped == pytest.approx(0.17, abs=0.015)
    assert (y == 1).float().mean().item() == pytest.approx(0.085, abs=0.01)


def test_rotating_back_by_the_opposite_angle_restores_the_digit():
    x = gaussian_blur(digits(4), 1.0)  # smooth: bilinear resampling twice loses little
    a = torch.tensor([0.4, -0.4, 0.2, 0.0])
    back = rotate_by(rotate_by(x, a), -a)
    assert (back - x).abs().mean() < 0.01 and (back - x).abs().max() < 0.15
    assert torch.allclose(rotate_by(x, torch.zeros(4)), x, atol=1e-5)


def test_positive_angles_turn_counter_clockwise_on_screen():
    x = torch.zeros(1, 1, 28, 28)
    x[..., 13:15, 20:27] = 1.0  # a bar to the right of the centre
    y = rotate_by(x, torch.tensor([1.5708]))
    rows, cols = y[0, 0].nonzero(as_tuple=True)
    assert rows.float().mean() < 10 and (cols.float().mean() - 13.5).abs() < 1.5  # now above the centre


def test_shear_keeps_the_centre_row_in_place():
    x = digits(2)
    y = shear_by(x, torch.tensor([0.4, -0.4]))
    assert torch.allclose(y[..., 13:15, :].sum(), x[..., 13:15, :].sum(), rtol=0.1)


def test_gaussian_blur_preserves_the_mean_away_from_the_edges():
    x = digits(4)  # zero within 6 px of every edge; sigma 1.5 reaches 6 px
    for sigma in (0.7, 1.0, 1.5):
        assert gaussian_blur(x, sigma).sum().item() == pytest.approx(x.sum().item(), rel=1e-5)
    assert gaussian_blur(x, 1.0, dims=(-2,)).sum().item() == pytest.approx(x.sum().item(), rel=1e-5)


def test_glass_blur_blurs_vertically_only_before_the_shuffle():
    x = torch.zeros(1, 1, 28, 28)
    x[..., 14, 14] = 1.0
    y = gaussian_blur(x, 0.7, dims=(-2,))
    assert (y[0, 0, :, 14] > 0).sum() == 7 and (y[0, 0, 14] > 0).sum() == 1


def test_motion_kernels_follow_imagemagick_offsets():
    k = motion_kernels(torch.tensor([0.0, 90.0, 45.0]), 41)  # (3, 41, 41), centre 20
    assert torch.allclose(k.sum((1, 2)), torch.ones(3, dtype=torch.float64))
    assert (k[0, 20, 20:] > 0).all() and k[0].count_nonzero() == 21  # 0 degrees: 21 taps to the right
    assert (k[1, 20:, 20] > 0).all() and k[1].count_nonzero() == 21  # 90 degrees: downward
    rows, cols = k[2].nonzero(as_tuple=True)  # 45 degrees: the diagonal, where taps 1 and 2 share a pixel
    assert torch.equal(rows, cols) and k[2, 21, 21] == k[2].max() and len(rows) == 15


def test_dotted_line_keeps_two_column_bands_and_drops_column_27():
    line = line_from_points(*[torch.tensor([v], dtype=torch.float64) for v in (0.0, 10.0, 27.0, 10.0)])[0]
    assert torch.equal(line[10], torch.cat([torch.ones(27), torch.zeros(1)]).double())
    y = corrupt("dotted_line", torch.zeros(4, 1, 28, 28), seed=0)
    ink = y[:, 0].amax(1) > 0  # (4, 28) columns with ink
    assert torch.equal(ink, ((torch.arange(28) // 2) % 2 == 1).expand(4, 28) & (torch.arange(28) < 27))


def test_zigzag_points_are_the_references():
    pts = zigzag_points(10.0, 10.0)  # flat: teeth at columns 2 + 2, 6, ..., 22, then the quirky end
    assert [round(c, 6) for c, _ in pts] == [2, 4, 8, 12, 16, 20, 24, 25]
    assert [r for _, r in pts[:7]] == [10, 12, 8, 12, 8, 12, 8] and pts[-1][1] == pytest.approx(10 - 2 / 6)


def test_canny_finds_the_outline_of_a_square():
    x = torch.zeros(1, 1, 28, 28)
    x[..., 8:20, 8:20] = 1.0
    e = canny(x)[0, 0]
    assert e[8:20, 8:20].sum() > 30 and not e[11:17, 11:17].any() and not e[:5].any()
    assert not canny(torch.zeros(1, 1, 28, 28)).any() and not canny(torch.full((1, 1, 28, 28), 0.7)).any()


# ---------------------------------------------------------------- the filters against scipy


def test_filters_match_scipy():
    ndi = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    a = x[0, 0].numpy()
    same = lambda ours, ref: np.allclose(ours[0, 0].numpy(), ref)
    assert same(gaussian_blur(x, 1.5), ndi.gaussian_filter(a, 1.5, mode="nearest"))
    assert same(gaussian_blur(x, 1.0, mode="constant"), ndi.gaussian_filter(a, 1.0, mode="constant"))
    assert same(gaussian_blur(x, 0.7, dims=(-2,)), ndi.gaussian_filter1d(a, 0.7, axis=0, mode="nearest"))
    rows, cols = sobel(x)
    assert same(rows, ndi.sobel(a, axis=0)) and same(cols, ndi.sobel(a, axis=1))


def test_warp_matches_scipy_affine_transform():
    ndi = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    A = torch.tensor([[[1.0, -0.39], [0.0, 0.92]]], dtype=torch.float64)
    t = torch.tensor([[5.3, 1.1]], dtype=torch.float64)
    # scipy works in (row, col): input (r, c) = M (r, c) + offset, zero outside ("grid-constant")
    M = np.array([[A[0, 1, 1], A[0, 1, 0]], [A[0, 0, 1], A[0, 0, 0]]])
    ref = ndi.affine_transform(x[0, 0].numpy(), M, offset=[t[0, 1], t[0, 0]], order=1, mode="grid-constant")
    assert np.allclose(warp(x, A, t)[0, 0].numpy(), ref, atol=1e-6)


def test_hysteresis_keeps_the_weak_components_that_touch_a_strong_pixel():
    ndi = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(0)
    weak = torch.rand(4, 1, 28, 28, generator=g) < 0.45
    strong = weak & (torch.rand(4, 1, 28, 28, generator=g) < 0.02)
    for b in range(4):  # skimage's way: label the 8-connected weak components, keep those with a strong pixel
        labels, count = ndi.label(weak[b, 0].numpy(), np.ones((3, 3), bool))
        good = np.zeros(count + 1, bool)
        good[np.unique(labels[strong[b, 0].numpy()])] = True
        good[0] = False
        assert np.array_equal(hysteresis(strong, weak)[b, 0].numpy(), good[labels])


# ---------------------------------------------------------------- the released-data reader


def write_mnist_c(root, name="shot_noise", n=5, images=None, labels=None):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8) if images is None else images
    np.save(folder / "test_images.npy", images)
    np.save(folder / "test_labels.npy", rng.integers(0, 10, n).astype(np.uint8) if labels is None else labels)
    return folder


def test_mnist_c_reader_reads_the_released_layout(tmp_path):
    folder = write_mnist_c(tmp_path, n=5)
    x, y = load_mnist_c(tmp_path, "shot_noise")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(np.load(folder / "test_images.npy")[..., 0]))


@pytest.mark.parametrize(("kind", "match"), [
    ("no folder", "does not exist"), ("no labels", "is missing"), ("shape", r"expected \(N, 28, 28, 1\)"),
    ("dtype", "expected uint8"), ("count", "5 images but 4 labels"), ("pickle", "not a readable .npy"),
])  # fmt: skip
def test_mnist_c_reader_refuses_bad_data_in_one_line(tmp_path, kind, match):
    if kind == "no folder":
        tmp_path.joinpath("fog").mkdir()
    elif kind == "no labels":
        (write_mnist_c(tmp_path) / "test_labels.npy").unlink()
    elif kind == "shape":
        write_mnist_c(tmp_path, images=np.zeros((5, 28, 28), np.uint8))
    elif kind == "dtype":
        write_mnist_c(tmp_path, images=np.zeros((5, 28, 28, 1), np.float32))
    elif kind == "count":
        write_mnist_c(tmp_path, labels=np.zeros(4, np.int64))
    else:
        np.save(write_mnist_c(tmp_path) / "test_labels.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CapsbenchError, match=match) as err:
        load_mnist_c(tmp_path, "shot_noise")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the part


def fake_context(n=24):
    from tests.test_affine import fake_ctx

    return fake_ctx(n=n)


SMALL = CorruptionsConfig(n=12, corruptions=["brightness", "stripe", "translate"], batch_size=5, baseline="other")


def corruptions_case(data, root):
    """The tiny case for tests/test_parts.py's CASES (every registered part runs on one)."""
    return fake_context(), SMALL


def test_the_part_is_registered_with_its_sizes():
    p = PARTS.get("corruptions")
    assert p.run is run_corruptions and p.tables == {"corruptions": COLUMNS}
    assert [p.sized(s)["n"] for s in ("smoke", "quick", "standard")] == [64, 500, 2000] and p.sized("full") == {}
    assert CorruptionsConfig().n == 10000 and CorruptionsConfig().corruptions == list(NAMES)


def test_the_config_refuses_unknown_corruptions_and_missing_folders():
    with pytest.raises(CapsbenchError, match="unknown 'frost'"):
        from_dict(CorruptionsConfig, {"corruptions": ["fog", "frost"]}, "corruptions")
    with pytest.raises(CapsbenchError, match="not a folder"):
        from_dict(CorruptionsConfig, {"mnist_c_path": "/nonexistent/mnist_c"}, "corruptions")


def test_the_part_writes_rows_ce_and_a_mean_row():
    res = run_corruptions(fake_context(), SMALL)
    df = res.tables["corruptions"]
    assert tuple(df.columns) == COLUMNS
    assert len(df) == 2 * (1 + 3 + 1) and set(df.source) == {"mnist", "torch"}
    assert ((df.ci_low <= df.accuracy) & (df.accuracy <= df.ci_high)).all()
    base = df[df.model == "other"].set_index("corruption")
    assert (base.ce.drop(["clean"]) == 1).all() | base.error.drop(["clean", "mean"]).eq(0).any()
    t = df[df.model == "template"].set_index("corruption")
    assert t.loc["clean", "accuracy"] == 1.0 and t.loc["stripe", "n"] == 12
    assert t.loc["mean", "accuracy"] == pytest.approx(t.accuracy.drop(["clean", "mean"]).mean())
    assert set(res.figures) == {"corruptions_accuracy", "corruptions_examples"} and all(c.passed for c in res.checks)
    assert "## MNIST-C corruptions" in res.summary and "relative mCE" in res.summary


def test_ce_columns_are_empty_without_the_baseline():
    res = run_corruptions(fake_context(), replace(SMALL, baseline="cnn-pooled", corruptions=["brightness"]))
    df = res.tables["corruptions"]
    assert df.ce.isna().all() and df.relative_ce.isna().all() and "`cnn-pooled` is not in this run" in res.summary


def test_the_part_reads_released_folders_instead(tmp_path):
    ctx = fake_context()
    for name in ("fog", "zigzag"):
        imgs = (ctx.test_x[:, :, :, None].numpy()).astype(np.uint8)
        write_mnist_c(tmp_path, name, images=imgs, labels=ctx.test_y.numpy())
    res = run_corruptions(ctx, replace(SMALL, corruptions=["fog", "zigzag"], mnist_c_path=str(tmp_path)))
    df = res.tables["corruptions"]
    assert set(df.source) == {"mnist", "released"}
    g = df[df.model == "template"].set_index("corruption")
    assert g.loc["fog", "correct"] == g.loc["clean", "correct"]  # the "released" images are the clean ones
    assert sum("labels equal" in c.name for c in res.checks) == 2 and all(c.passed for c in res.checks)


@pytest.mark.slow
def test_the_main_job_runs_the_corruptions_part_on_smoke(robustness_smoke):
    """The main job (tests/conftest.py runs it once at smoke size) writes the corruptions table,
    its plots and headline; the corruptions suite itself runs in tests/test_suites.py."""
    import pandas as pd

    out = robustness_smoke
    df = pd.read_csv(out / "tables" / "corruptions.csv")
    assert tuple(df.columns) == COLUMNS and set(df.model) == {"capsnet", "cnn-pooled"}
    assert set(df.corruption) == {"clean", "mean", *NAMES} and (df[df.corruption != "mean"].n == 64).all()
    base = df[(df.model == "cnn-pooled") & (df.corruption != "clean")]
    assert base.ce.dropna().eq(1).all() and df[df.corruption == "clean"].ce.isna().all()  # the baseline's own CE is 1
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"corruptions_accuracy.png", "corruptions_examples.png"}
    assert "MNIST-C mean %" in (out / "summary.md").read_text()
