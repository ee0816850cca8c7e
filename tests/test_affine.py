"""Affine transforms (direction, size, identity, bounds), the composite set, the .mat reader and
the affine part end to end on a fake RunContext."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from capsbench.core.config import from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.data.affnist import load_affnist
from capsbench.data.transforms import (
    TRANSFORMS,
    affine_from_uniforms,
    affine_matrix,
    apply_affine,
    digit_boxes,
    random_affine,
    single_factor,
)  # fmt: skip
from capsbench.models import BenchModel, ModelOutput, build_model
from capsbench.parts.affine import AffineConfig, check_translation, composite_uniforms, run_affine
from capsbench.parts.base import PARTS, RunContext
from capsbench.train.config import TrainConfig

# ---------------------------------------------------------------- transforms


def blob(n=4, size=40, seed=0, side=12):
    """Random side x side 'digits' centred on a size x size canvas, zero background."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    a = (size - side) // 2
    x[:, :, a : a + side, a : a + side] = 0.2 + 0.8 * torch.rand(n, 1, side, side, generator=g)
    return x


def centre_of_mass(x):
    idx = torch.arange(x.shape[-1], dtype=torch.float32)
    m = x[:, 0].sum((1, 2))
    return (x[:, 0].sum(1) * idx).sum(1) / m, (x[:, 0].sum(2) * idx).sum(1) / m  # (cx, cy)


def params(B, rotation=0.0, scale=1.0, shear=0.0, tx=0.0, ty=0.0):
    return [torch.full((B,), float(v)) for v in (rotation, scale, shear, tx, ty)]


@pytest.mark.parametrize(("factor", "value"), [("rotation", 0.0), ("scale", 1.0), ("shear", 0.0), ("translation", 0.0)])
def test_identity_returns_the_input_exactly(factor, value):
    x = blob()
    assert torch.equal(single_factor(x, factor, value), x)


def test_identity_matrix_and_zero_ranges_reproduce_the_input_exactly():
    x = blob(6)
    theta = affine_matrix(*params(6), size=40)
    assert torch.equal(theta, torch.eye(2, 3).expand(6, 2, 3))
    assert torch.equal(apply_affine(x, theta), x)  # grid_sample alone is off by ~1e-6: identity rows are skipped
    y, _ = random_affine(x, torch.Generator().manual_seed(0), rotation=0.0, shear=0.0, scale=(1.0, 1.0), translate=False)
    assert torch.equal(y, x)
    mixed = torch.cat([theta[:3], affine_matrix(*params(3, rotation=10.0), size=40)])
    out = apply_affine(x, mixed)
    assert torch.equal(out[:3], x[:3]) and not torch.equal(out[3:], x[3:])


def test_translation_moves_the_centre_of_mass_in_pixels():
    x = blob()
    cx0, cy0 = centre_of_mass(x)
    cx1, cy1 = centre_of_mass(single_factor(x, "translation", 3.0))
    torch.testing.assert_close(cx1 - cx0, torch.full_like(cx0, 3.0), atol=0.5, rtol=0)
    torch.testing.assert_close(cy1, cy0, atol=0.5, rtol=0)
    cx2, cy2 = centre_of_mass(apply_affine(x, affine_matrix(*params(4, tx=-2.0, ty=4.0), size=40)))
    torch.testing.assert_close(cx2 - cx0, torch.full_like(cx0, -2.0), atol=0.5, rtol=0)  # left
    torch.testing.assert_close(cy2 - cy0, torch.full_like(cy0, 4.0), atol=0.5, rtol=0)  # down


def test_scale_two_enlarges_and_half_shrinks_the_digit():
    x = blob()
    width = lambda z: digit_boxes(z)[:, 2] - digit_boxes(z)[:, 0]  # noqa: E731
    assert (width(single_factor(x, "scale", 2.0)) > 1.8 * width(x)).all()
    assert (width(single_factor(x, "scale", 0.5)) < 0.7 * width(x)).all()


def test_four_quarter_turns_are_nearly_the_identity():
    x = blob()
    y = x
    for _ in range(4):
        y = single_factor(y, "rotation", 90.0)
    assert (y - x).abs().mean() < 0.02


def test_rotation_is_counter_clockwise_on_screen():
    x = torch.zeros(1, 1, 40, 40)
    x[0, 0, 19:21, 30:34] = 1  # a bar to the right of the centre
    cx, cy = centre_of_mass(single_factor(x, "rotation", 90.0))
    assert cy.item() < 15 and abs(cx.item() - 19.5) < 1  # now above the centre (y grows downward)


def test_shear_moves_the_lower_half_right():
    x = torch.zeros(1, 1, 40, 40)
    x[0, 0, 8:32, 19:21] = 1  # a vertical bar through the centre
    y = single_factor(x, "shear", 0.5)  # x' = x + 0.5 * y, y downward
    top, bottom = y.clone(), y.clone()
    top[..., 20:, :], bottom[..., :20, :] = 0, 0
    # the halves' centres are 12 px apart vertically, so 0.5 * 12 = 6 px apart horizontally, bottom to the right
    assert 5 < centre_of_mass(bottom)[0].item() - centre_of_mass(top)[0].item() < 7


@pytest.mark.parametrize("factor", TRANSFORMS.names())
def test_pixels_stay_in_unit_interval_and_the_registry_applies_the_factor(factor):
    x = blob()
    x[:, :, 14:26, 14:16] = 1.0  # saturated strokes
    value = {"rotation": 37.0, "scale": 1.3, "shear": 0.4, "translation": 5.0}[factor]
    y = TRANSFORMS.get(factor)(x, value)
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, single_factor(x, factor, value)) and not torch.equal(y, x)


def test_unknown_factor_is_refused_with_the_known_ones():
    with pytest.raises(CapsbenchError, match="unknown transform 'skew'.*rotation, scale, shear, translation"):
        single_factor(blob(), "skew", 1.0)


def test_digit_boxes():
    x = torch.zeros(2, 1, 10, 10)
    x[0, 0, 2:5, 6:9] = 0.5  # rows 2..4, cols 6..8
    assert digit_boxes(x).tolist() == [[6 - 4.5, 2 - 4.5, 8 - 4.5, 4 - 4.5], [0.0, 0.0, 0.0, 0.0]]


def test_random_affine_is_seeded_in_range_and_keeps_digits_inside():
    x = blob(64)
    a, pa = random_affine(x, torch.Generator().manual_seed(1))
    b, pb = random_affine(x, torch.Generator().manual_seed(1))
    c, _ = random_affine(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(a, c)
    assert pa["rotation"].abs().max() <= 20 and pa["shear"].abs().max() <= 0.2
    assert pa["scale"].min() >= 0.8 and pa["scale"].max() <= 1.2
    assert pa["fits"].all() and pa["tx"].abs().max() > 4 and pa["ty"].abs().max() > 4  # translations happen
    border = a[:, 0, [0, -1], :].sum() + a[:, 0, :, [0, -1]].sum()
    assert border < 1e-4  # the transformed digit never reaches the outermost pixels
    assert a.min() >= 0 and a.max() <= 1
    assert (a.sum((1, 2, 3)) / x.sum((1, 2, 3)) - pa["scale"] ** 2).abs().max() < 0.1  # ink kept: nothing cut off


def test_a_digit_that_does_not_fit_is_not_translated():
    x = blob(3, side=36)
    u = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    _, p = affine_from_uniforms(x, u, rotation=10.0, shear=0.0, scale=(1.2, 1.2))
    assert not p["fits"].any() and (p["tx"] == 0).all() and (p["ty"] == 0).all()


def test_random_affine_equals_its_uniforms_form():
    x = blob(5)
    u = torch.rand(5, 5, generator=torch.Generator().manual_seed(3))
    a, _ = random_affine(x, torch.Generator().manual_seed(3), rotation=30.0, shear=0.3, scale=(0.7, 1.1))
    b, _ = affine_from_uniforms(x, u, rotation=30.0, shear=0.3, scale=(0.7, 1.1))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- affNIST .mat reader


def write_affnist(path, images, labels):
    """Write an affNIST-like file: one image per column, row-major (as our reader assumes)."""
    from scipy.io import savemat

    savemat(path, {"affNISTdata": {"image": images.reshape(len(images), 1600).T, "label_int": labels,
                                   "human_readable_transform": np.zeros((7, len(images)))}})  # fmt: skip


def ell(n=1):
    img = np.zeros((n, 40, 40), np.uint8)
    img[:, 5:30, 8] = 255  # vertical stroke of an 'L' ...
    img[:, 29, 8:25] = 255  # ... and its foot at the bottom, pointing right
    return img


def test_affnist_reader_keeps_orientation_and_file_order(tmp_path):
    pytest.importorskip("scipy")
    img = ell(2)
    img[1] = img[1, ::-1]  # the second image upside down
    write_affnist(tmp_path / "1.mat", img, np.array([3, 7]))
    write_affnist(tmp_path / "2.mat", ell(), np.array([5]))
    write_affnist(tmp_path / "10.mat", ell()[:, :, ::-1], np.array([9]))  # numeric order: after 2.mat
    x, y = load_affnist(tmp_path)
    assert x.shape == (4, 40, 40) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [3, 7, 5, 9]
    assert torch.equal(x[0], torch.from_numpy(img[0])) and torch.equal(x[1], torch.from_numpy(img[1].copy()))
    assert x[0, 29, 20] == 255 and x[0, 10, 20] == 0  # the foot is at the bottom, pointing right: upright
    one, label = load_affnist(tmp_path / "2.mat")  # a single file with a single image
    assert one.shape == (1, 40, 40) and label.tolist() == [5]


def test_affnist_reader_refuses_other_files(tmp_path):
    pytest.importorskip("scipy")
    from scipy.io import savemat

    savemat(tmp_path / "x.mat", {"something": np.zeros(3)})
    with pytest.raises(CapsbenchError, match="x.mat has no affNISTdata struct"):
        load_affnist(tmp_path / "x.mat")
    savemat(tmp_path / "shape.mat", {"affNISTdata": {"image": np.zeros((1500, 2), np.uint8), "label_int": [1, 2]}})
    with pytest.raises(CapsbenchError, match="shape.mat: affNISTdata.image should be 1600 x N"):
        load_affnist(tmp_path / "shape.mat")
    savemat(tmp_path / "count.mat", {"affNISTdata": {"image": np.zeros((1600, 3), np.uint8), "label_int": [1, 2]}})
    with pytest.raises(CapsbenchError, match="with N labels"):
        load_affnist(tmp_path / "count.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk")
    with pytest.raises(CapsbenchError, match="junk.mat is not a readable .mat"):
        load_affnist(tmp_path / "junk.mat")
    with pytest.raises(CapsbenchError, match="missing does not exist"):
        load_affnist(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CapsbenchError, match="notes.txt is not a .mat file"):
        load_affnist(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CapsbenchError, match="holds no .mat files"):
        load_affnist(tmp_path / "empty")


def test_affnist_reader_without_scipy_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import loadmat` fail
    with pytest.raises(CapsbenchError, match=r"pip install scipy.*capsbench\[affnist\]"):
        load_affnist(tmp_path / "test.mat")


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"scale_range": [1.2, 0.8]}, r"scale_range must be .* \(range reversed\)"),
        ({"scale_range": [0.0, 1.0]}, "scale_range must be"),
        ({"rotation_range": -5.0}, "rotation_range must be >= 0"),
        ({"shear_range": -0.1}, "shear_range must be >= 0"),
        ({"copies": 0}, "copies must be >= 1"),
        ({"n": 0}, "affine.n must be >= 1"),
        ({"scale": [0.0, 1.0]}, "scale values must be > 0"),
        ({"rotation": [0.0, 200.0]}, r"rotation values must be <= 180"),
        ({"rotation": []}, "rotation needs at least one value"),
        ({"shear": [float("nan")]}, "shear values must be a finite number"),
        ({"affnist_path": "/nonexistent/affnist"}, "affnist_path /nonexistent/affnist does not exist"),
        ({"n": "many"}, "affine.n: expected int"),
        ({"copys": 3}, "unknown key affine.copys"),
    ],
)
def test_bad_affine_config_is_refused(values, match):
    with pytest.raises(CapsbenchError, match=match):
        from_dict(AffineConfig, values, where="affine")


def test_translation_limit_depends_on_the_canvas():
    cfg = AffineConfig()  # largest translation 8 px
    check_translation(cfg, 40)  # limit (40 - 20) / 2 = 10
    with pytest.raises(CapsbenchError, match=r"affine.translation: 8 px is more than 4 px = \(S - 20\) / 2"):
        check_translation(cfg, 28)
    check_translation(replace(cfg, translation=[0.0, -4.0, 4.0]), 28)


# ---------------------------------------------------------------- the part, end to end

PROTOTYPES = [(4 + 7 * (k // 4), 5 + 5 * (k % 4)) for k in range(10)]  # class k: a 4x4 block at (row, col)


def synthetic(n, seed=0):
    """28x28 uint8 'digits' with a clean background: class k is a bright 4x4 block at PROTOTYPES[k]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for k, (r, c) in enumerate(PROTOTYPES):
        x[y == k, r : r + 4, c : c + 4] = 255
    return x, y


class TemplateModel(BenchModel):
    """Scores = overlap with each class's block on the (centred) input: 100% on clean inputs."""

    num_classes, loss_name = 10, "none"

    def __init__(self, templates):
        super().__init__()
        self.input_size = templates.shape[-1]
        self.register_buffer("templates", templates)  # (10, S, S)

    def forward(self, x, y=None):
        return ModelOutput(scores=torch.einsum("bchw,khw->bk", x, self.templates))


class TinyCNN(BenchModel):
    """An untrained, seeded conv net: a second model that reads the images differently."""

    num_classes, loss_name = 10, "none"

    def __init__(self, size):
        super().__init__()
        self.input_size = size
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                       torch.nn.LazyLinear(10))  # fmt: skip
        self.net(torch.zeros(1, 1, size, size))

    def forward(self, x, y=None):
        return ModelOutput(scores=self.net(x))


def fake_ctx(size=28, n=40, seed=0, capsnet=False):
    """Two models: the template matcher and a tiny CapsNet (the real interface) or a tiny CNN (faster)."""
    train = TrainConfig(augment="canvas", canvas=size) if size != 28 else TrainConfig(augment="none")
    protos = torch.zeros(10, 28, 28, dtype=torch.uint8)
    for k, (r, c) in enumerate(PROTOTYPES):
        protos[k, r : r + 4, c : c + 4] = 255
    ctx = RunContext(models={}, test_x=torch.empty(0), test_y=torch.empty(0), train_cfg=train,
                     device=torch.device("cpu"), dtype=None, seed=seed, progress=False)  # fmt: skip
    templates = ctx.test_inputs(protos)[:, 0]
    torch.manual_seed(0)
    other = build_model("capsnet", conv_channels=16, primary_types=4, input_size=size) if capsnet else TinyCNN(size)
    ctx.models = {"template": SimpleNamespace(model=TemplateModel(templates).eval(), meta={"params": 0}),
                  "other": SimpleNamespace(model=other.eval(), meta={"params": other.num_params()})}  # fmt: skip
    ctx.test_x, ctx.test_y = synthetic(n, seed=1)
    return ctx


SMALL = AffineConfig(n=24, rotation=[0.0, 45.0], scale=[0.6, 1.0], shear=[0.0, 0.4], translation=[0.0, 4.0],
                     composite_n=10, copies=3, batch_size=16)  # fmt: skip
COLUMNS = ["model", "transform", "value", "accuracy", "n", "seed", "correct",
           "rotation_range", "shear_range", "scale_lo", "scale_hi", "copies"]  # fmt: skip


def test_affine_part_is_registered():
    cfg_cls, fn = PARTS.get("affine").config, PARTS.get("affine").run
    assert cfg_cls is AffineConfig and fn is run_affine


def test_affine_part_end_to_end_on_28x28():
    ctx = fake_ctx(capsnet=True)
    res = run_affine(ctx, SMALL)
    df = res.tables["affine"]
    assert list(df.columns) == COLUMNS
    assert set(df["transform"]) == {"clean", "rotation", "scale", "shear", "translation", "composite"}
    assert len(df) == 2 * (1 + 8 + 1)
    for model, g in df.groupby("model"):
        t = g.set_index(["transform", "value"], drop=False)
        clean = g[g["transform"] == "clean"].iloc[0]
        for factor, ident in [("rotation", 0.0), ("scale", 1.0), ("shear", 0.0), ("translation", 0.0)]:
            assert t.loc[(factor, ident), "correct"] == clean.correct  # identity == clean, exactly
        comp = g[g["transform"] == "composite"].iloc[0]
        assert comp.n == 10 * 3 and math.isnan(comp.value)
        assert (comp.rotation_range, comp.shear_range, comp.scale_lo, comp.scale_hi, comp.copies) == (20, 0.2, 0.8, 1.2, 3)
        assert g[g["transform"] != "composite"][["rotation_range", "copies"]].isna().all().all()
        assert (g[g["transform"] != "composite"].n == 24).all() and (g.seed == 0).all()
    tpl = df[df.model == "template"]
    acc = lambda t, v=None: tpl[(tpl["transform"] == t) & ((tpl.value == v) if v is not None else True)].accuracy.iloc[0]  # noqa: E731
    assert acc("clean") == 1.0 and acc("composite") < 1.0 and acc("rotation", 45.0) < 1.0
    assert set(res.figures) == {"affine_sweeps", "affine_composite", "affine_examples"}
    assert all(isinstance(f, Figure) for f in res.figures.values())
    assert res.summary.startswith("## Affine (affNIST-style)")
    assert "### template" in res.summary and "not evaluated" in res.summary and "3 random transforms" in res.summary
    names = [c.name for c in res.checks]
    assert sum("equals clean exactly" in n for n in names) == 8 and any("[0, 1]" in n for n in names)
    assert all(c.passed for c in res.checks if "informational" not in c.name), [c for c in res.checks if not c.passed]


def test_composite_set_is_the_same_for_any_batch_size_and_rerun():
    ctx = fake_ctx(n=20)
    cfg = replace(SMALL, n=4, composite_n=20, copies=2)
    a = run_affine(ctx, replace(cfg, batch_size=7)).tables["affine"]
    b = run_affine(ctx, replace(cfg, batch_size=20)).tables["affine"]
    comp = lambda d: d[d["transform"] == "composite"].set_index("model").correct  # noqa: E731
    assert comp(a).equals(comp(b))
    assert torch.equal(composite_uniforms(0, 1, 20), composite_uniforms(0, 1, 20))
    assert not torch.equal(composite_uniforms(0, 0, 20), composite_uniforms(0, 1, 20))  # copies differ
    assert not torch.equal(composite_uniforms(0, 0, 20), composite_uniforms(1, 0, 20))  # the seed matters


def test_translation_beyond_the_canvas_limit_is_refused_before_any_work():
    with pytest.raises(CapsbenchError, match="affine.translation: 6 px is more than 4 px"):
        run_affine(fake_ctx(), replace(SMALL, translation=[0.0, 6.0]))


def test_affnist_row_on_40x40_and_skipped_on_28x28(tmp_path):
    pytest.importorskip("scipy")
    ctx = fake_ctx(size=40, n=30)
    x40 = (ctx.test_inputs(ctx.test_x)[:, 0] * 255).round().to(torch.uint8).numpy()  # centred 40x40 digits
    write_affnist(tmp_path / "test.mat", x40, ctx.test_y.numpy())
    cfg = replace(SMALL, translation=[0.0, 8.0], affnist_path=str(tmp_path / "test.mat"))
    res = run_affine(ctx, cfg)
    aff = res.tables["affine"].set_index(["model", "transform"])
    assert aff.loc[("template", "affnist"), "accuracy"] == 1.0 and aff.loc[("template", "affnist"), "n"] == 30
    orient = [c for c in res.checks if "orientation" in c.name]
    assert len(orient) == 2 and next(c for c in orient if "template" in c.name).passed
    assert "100.0% as read" in next(c for c in orient if "template" in c.name).detail
    assert "real affNIST: 30 images" in res.summary

    res28 = run_affine(fake_ctx(n=30), replace(SMALL, affnist_path=str(tmp_path / "test.mat")))
    assert "affnist" not in set(res28.tables["affine"]["transform"])
    assert "skipped: it is 40x40 and these models take 28x28 inputs" in res28.summary
