"""Affine transforms (direction, size, identity, bounds), the composite set, the .mat reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capsbench.affnist import load_affnist
from capsbench.config import from_dict
from capsbench.errors import CapsbenchError
from capsbench.suites.affine import AffineConfig
from capsbench.transforms import TRANSFORMS, digit_boxes, random_affine, single_factor


def blob(n=4, size=40, seed=0):
    """Random 12x12 'digits' centred on a size x size canvas."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    a = (size - 12) // 2
    x[:, :, a : a + 12, a : a + 12] = 0.2 + 0.8 * torch.rand(n, 1, 12, 12, generator=g)
    return x


def centre_of_mass(x):
    idx = torch.arange(x.shape[-1], dtype=torch.float32)
    m = x[:, 0].sum((1, 2))
    return (x[:, 0].sum(1) * idx).sum(1) / m, (x[:, 0].sum(2) * idx).sum(1) / m  # (cx, cy)


@pytest.mark.parametrize(("factor", "value"), [("rotation", 0.0), ("scale", 1.0), ("shear", 0.0), ("translation", 0.0)])
def test_identity_returns_the_input_exactly(factor, value):
    x = blob()
    assert torch.equal(single_factor(x, factor, value), x)


def test_translation_moves_the_centre_of_mass_right():
    x = blob()
    (cx0, cy0), (cx1, cy1) = centre_of_mass(x), centre_of_mass(single_factor(x, "translation", 3.0))
    torch.testing.assert_close(cx1 - cx0, torch.full_like(cx0, 3.0), atol=0.5, rtol=0)
    torch.testing.assert_close(cy1, cy0, atol=0.5, rtol=0)


def test_scale_two_enlarges_the_digit():
    x = blob()
    w0 = digit_boxes(x)[:, 2] - digit_boxes(x)[:, 0]
    y = single_factor(x, "scale", 2.0)
    w1 = digit_boxes(y)[:, 2] - digit_boxes(y)[:, 0]
    assert (w1 > 1.8 * w0).all()


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


@pytest.mark.parametrize("factor", TRANSFORMS.names())
def test_pixels_stay_in_unit_interval(factor):
    x = blob()
    y = single_factor(x, factor, {"rotation": 37.0, "scale": 1.3, "shear": 0.4, "translation": 5.0}[factor])
    assert y.min() >= 0 and y.max() <= 1


def test_random_affine_is_seeded_in_range_and_keeps_digits_inside():
    x = blob(64)
    a, pa = random_affine(x, torch.Generator().manual_seed(1))
    b, pb = random_affine(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert pa["rotation"].abs().max() <= 20 and pa["shear"].abs().max() <= 0.2
    assert pa["scale"].min() >= 0.8 and pa["scale"].max() <= 1.2
    assert pa["tx"].abs().max() > 2  # translations actually happen
    border = a[:, 0, [0, -1], :].abs().sum() + a[:, 0, :, [0, -1]].abs().sum()
    assert border == 0  # one pixel of margin: nothing reaches the outermost pixels
    assert a.min() >= 0 and a.max() <= 1


def write_affnist(path, images, labels):
    from scipy.io import savemat

    savemat(path, {"affNISTdata": {"image": images.reshape(len(images), 1600).T, "label_int": labels,
                                   "human_readable_transform": np.zeros((7, len(images)))}})  # fmt: skip


def test_affnist_reader_keeps_orientation(tmp_path):
    pytest.importorskip("scipy")
    ell = np.zeros((2, 40, 40), np.uint8)
    ell[:, 5:30, 8] = 255  # vertical stroke of an 'L' ...
    ell[:, 29, 8:25] = 255  # ... and its foot at the bottom
    ell[1] = ell[1, ::-1]  # the second image upside down
    write_affnist(tmp_path / "1.mat", ell, np.array([3, 7]))
    write_affnist(tmp_path / "2.mat", ell[:1], np.array([5]))
    x, y = load_affnist(tmp_path)
    assert x.shape == (3, 40, 40) and x.dtype == torch.uint8
    assert y.tolist() == [3, 7, 5]
    assert torch.equal(x[0], torch.from_numpy(ell[0])) and torch.equal(x[1], torch.from_numpy(ell[1].copy()))
    assert x[0, 29, 20] == 255 and x[0, 10, 20] == 0  # the foot is at the bottom: upright


def test_affnist_reader_refuses_other_files(tmp_path):
    pytest.importorskip("scipy")
    from scipy.io import savemat

    savemat(tmp_path / "x.mat", {"something": np.zeros(3)})
    with pytest.raises(CapsbenchError, match="no affNISTdata struct"):
        load_affnist(tmp_path / "x.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk")
    with pytest.raises(CapsbenchError, match="not a readable .mat"):
        load_affnist(tmp_path / "junk.mat")
    with pytest.raises(CapsbenchError, match="does not exist"):
        load_affnist(tmp_path / "missing")


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"scale_range": [1.2, 0.8]}, "scale_range must be"),
        ({"rotation_range": -5.0}, "rotation_range and shear_range must be >= 0"),
        ({"copies": 0}, "copies must be >= 1"),
        ({"scale": [0.0, 1.0]}, "scale values must be > 0"),
        ({"rotation": []}, "rotation needs at least one value"),
        ({"n": "many"}, "affine.n: expected int"),
    ],
)
def test_bad_affine_config_is_refused(values, match):
    with pytest.raises(CapsbenchError, match=match):
        from_dict(AffineConfig, values, where="affine")
