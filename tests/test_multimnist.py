"""MultiMNIST generator properties (issue 4): two different labels, shifts within bounds, pixel
range, determinism, and that each digit sits where its shift says."""

from __future__ import annotations

import pytest
import torch

from capsbench.data.augment import place, to_float
from capsbench.data.multimnist import multimnist, two_digit_error
from tests.conftest import synthetic_digits


@pytest.fixture(scope="module")
def digits():
    return synthetic_digits(300, 3)


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_two_different_labels_shifts_in_bounds_pixels_in_range(digits, combine):
    x, y = digits
    images, labels, p = multimnist(x, y, 500, seed=0, combine=combine)
    assert images.shape == (500, 1, 36, 36) and labels.shape == (500, 2)
    assert (labels[:, 0] != labels[:, 1]).all()
    assert torch.equal(labels, y[p["index"]])
    assert p["shift"].abs().max() <= 4 and p["shift"].abs().max() == 4  # the whole range is used
    assert images.min() >= 0 and images.max() <= 1


def test_each_digit_is_where_its_shift_puts_it(digits):
    x, y = digits
    images, _, p = multimnist(x, y, 50, seed=1, combine="max")
    for k in range(2):
        layer = place(to_float(x[p["index"][:, k]]), 36, 4 + p["shift"][:, k, 0], 4 + p["shift"][:, k, 1])
        assert (images >= layer).all()  # max overlay: never darker than either digit
    first = place(to_float(x[p["index"][:, 0]]), 36, 4 + p["shift"][:, 0, 0], 4 + p["shift"][:, 0, 1])
    second = place(to_float(x[p["index"][:, 1]]), 36, 4 + p["shift"][:, 1, 0], 4 + p["shift"][:, 1, 1])
    assert torch.equal(images, torch.maximum(first, second))
    summed, _, _ = multimnist(x, y, 50, seed=1, combine="sum")
    assert torch.equal(summed, (first + second).clamp(0, 1))


def test_deterministic_for_a_seed_and_different_across_seeds(digits):
    x, y = digits
    a = multimnist(x, y, 64, seed=7)[0]
    assert torch.equal(a, multimnist(x, y, 64, seed=7)[0])
    assert not torch.equal(a, multimnist(x, y, 64, seed=8)[0])


def test_bad_arguments_are_refused(digits):
    x, y = digits
    with pytest.raises(ValueError, match="combine"):
        multimnist(x, y, 4, seed=0, combine="mean")
    with pytest.raises(ValueError, match="two classes"):
        multimnist(x[:5], torch.zeros(5, dtype=torch.long), 4, seed=0)


def test_two_digit_error_needs_both_digits():
    labels = torch.tensor([[1, 7], [2, 3], [4, 5]])
    scores = torch.zeros(3, 10)
    scores[0, [7, 1]] = 1.0  # both right, either order
    scores[1, [2, 9]] = 1.0  # one wrong
    scores[2, [6, 8]] = 1.0  # both wrong
    assert two_digit_error(scores, labels).tolist() == [False, True, True]
