"""Efficient-CapsNet: exact parameter counts, shapes, routing, squash, the vote surrogate, training."""

from __future__ import annotations

import pytest
import torch

from capsbench.models.efficient_capsnet import EfficientCapsNet, EfficientCapsNetConfig, efficient_squash
from tests.conftest import adam_losses


def make(**options) -> EfficientCapsNet:
    torch.manual_seed(0)
    return EfficientCapsNet(EfficientCapsNetConfig(**options))


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10


@pytest.mark.parametrize(("reconstruction", "expected"), [(False, 161_824), (True, 1_573_168)])
def test_exact_parameter_counts(reconstruction, expected):
    model = make(reconstruction=reconstruction)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_output_shapes_and_lengths():
    model = make()
    x, y = batch()
    out = model(x, y)
    assert out.scores.shape == (4, 10) and out.capsules.shape == (4, 10, 16)
    assert out.reconstruction.shape == (4, 784) and out.coupling.shape == (4, 16, 10)
    assert out.routing_logits is None
    assert ((out.scores >= 0) & (out.scores < 1)).all()
    assert torch.allclose(out.scores, out.capsules.norm(dim=-1))
    assert model.routes and model.reconstructs and model.primary_layout is None


def test_couplings_sum_to_one_over_parents():
    out = make()(*batch())
    assert torch.allclose(out.coupling.sum(dim=2), torch.ones(4, 16), atol=1e-6)


def test_batch_independence_in_eval_mode():
    model = make().eval()
    x, _ = batch(5)
    with torch.no_grad():
        whole, part = model(x), model(x[2:3])
    assert torch.allclose(whole.scores[2:3], part.scores, atol=1e-6)
    assert torch.allclose(whole.reconstruction[2:3], part.reconstruction, atol=1e-6)


def test_every_parameter_gets_a_finite_gradient():
    model = make()
    x, y = batch()
    loss = model.objective(model(x, y), x, y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_squash_is_finite_at_zero_and_below_one():
    s = torch.zeros(2, 8, requires_grad=True)
    v = efficient_squash(s)
    v.sum().backward()
    assert torch.equal(v, torch.zeros(2, 8)) and torch.isfinite(s.grad).all()
    n = torch.tensor([0.5, 2.0, 10.0])
    lengths = efficient_squash(n[:, None] * torch.eye(3)).norm(dim=-1)
    assert torch.allclose(lengths, 1 - torch.exp(-n), atol=1e-6)


def test_other_input_sizes_are_refused():
    with pytest.raises(ValueError, match="defined for 28x28 MNIST"):
        make(input_size=40)


def test_uniform_votes_changes_the_output_and_is_restored():
    model = make().eval()
    x, _ = batch()
    with torch.no_grad():
        before = model(x)
        with model.uniform_votes():
            surrogate = model(x)
            u_hat = model.votes(model.primary_capsules(x))
        after = model(x)
    assert torch.allclose(surrogate.capsules, efficient_squash(u_hat.sum(dim=1) / 10), atol=1e-6)
    assert torch.allclose(surrogate.coupling, torch.full((4, 16, 10), 0.1))
    assert not torch.allclose(before.scores, surrogate.scores)
    assert torch.equal(before.scores, after.scores)


def test_uniform_votes_restored_after_an_exception():
    model = make()
    with pytest.raises(RuntimeError), model.uniform_votes():
        raise RuntimeError
    assert not model._uniform_votes


def test_a_few_adam_steps_lower_the_loss():
    model = make()
    x, y = batch(8)
    losses = adam_losses(model, x, y, steps=6, lr=1e-3)
    assert losses[-1] < losses[0]


def test_registered_with_its_config():
    from capsbench.models import MODELS, build_model

    assert "efficient-capsnet" in MODELS.names()
    assert build_model("efficient-capsnet", reconstruction=False).num_params() == 161_824
    with pytest.raises(ValueError, match="defined for 28x28 MNIST"):
        build_model("efficient-capsnet", input_size=40)
