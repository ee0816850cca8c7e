"""Matrix capsules with EM routing (models/matrix_capsnet.py): size, shapes, routing properties.

Property tests use a narrow network (A=B=C=D=8), which runs the same code at 1/16 of the cost.
"""

from __future__ import annotations

import pytest
import torch

from capsbench.attacks.losses import resolve_loss
from capsbench.models import build_model
from capsbench.models.matrix_capsnet import (
    ConvCaps, MatrixCapsNet, MatrixCapsNetConfig, PlainVotes, Routing, Votes, param_count, spread_loss,
)  # fmt: skip

SMALL = dict(A=8, B=8, C=8, D=8)


def small(**kw) -> MatrixCapsNet:
    torch.manual_seed(0)
    return MatrixCapsNet(MatrixCapsNetConfig(**{**SMALL, **kw}))


def images(n: int, size: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def test_parameter_count_is_exact() -> None:
    cfg = MatrixCapsNetConfig()
    # conv1 832 + primary pose 16,896 + primary activation 1,056 + ConvCaps1 147,456 + 64 betas
    # + ConvCaps2 147,456 + 64 betas + class 5,120 + 20 betas (the paper: "310K")
    assert build_model("matrix-capsnet-em").num_params() == param_count(cfg) == 318_964
    paper_small = MatrixCapsNetConfig(A=64, B=8, C=16, D=16)  # the paper's "68K" configuration
    assert MatrixCapsNet(paper_small).num_params() == param_count(paper_small) == 68_444


@pytest.mark.parametrize("size", [28, 40])
def test_shapes_and_activations(size: int) -> None:
    model = MatrixCapsNet(MatrixCapsNetConfig(input_size=size))
    g = MatrixCapsNetConfig(input_size=size).grids[2]  # 3 at 28x28, 6 at 40x40
    with torch.no_grad():
        out = model(images(1, size))
    assert out.scores.shape == (1, 10) and out.capsules.shape == (1, 10, 16)
    assert out.coupling.shape == (1, 32 * g * g, 10) and model.primary_layout == (32, g)
    assert out.reconstruction is None and model.decoder is None and model.routes
    assert ((out.scores > 0) & (out.scores < 1)).all() and torch.isfinite(out.capsules).all()


def test_assignments_sum_to_one_over_parents() -> None:
    model, x = small(), images(2)
    with torch.no_grad():
        totals = model.assignment_totals(x)  # ConvCaps1, ConvCaps2 (each child's windows x types), class layer
        coupling = model(x).coupling
    assert [t.shape[1] for t in totals] == [8 * 11 * 11, 8 * 5 * 5, 8 * 3 * 3]  # stride 2 skips row/col 12
    for t in totals:
        torch.testing.assert_close(t, torch.ones_like(t), atol=1e-5, rtol=0)
    torch.testing.assert_close(coupling.sum(-1), torch.ones(2, 72), atol=1e-5, rtol=0)


def test_batch_independence() -> None:
    model, x = small(), images(2)
    with torch.no_grad():
        together = model(x)
        alone = [model(x[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(together.scores, torch.cat([o.scores for o in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(together.capsules, torch.cat([o.capsules for o in alone]), atol=1e-5, rtol=0)
    chunked = small(routing_chunk=1)  # the same weights, routed one example at a time
    with torch.no_grad():
        torch.testing.assert_close(chunked(x).scores, together.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner", [True, False])
def test_every_parameter_gets_a_finite_gradient(inner: bool) -> None:
    model, x = small(inner_routing_grad=inner), images(2)
    model.objective(model(x), x, torch.tensor([3, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fast", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_votes_gradient_matches_numerical(fast: bool) -> None:
    """The hand-accumulated gradient of the votes (``Votes``) against finite differences (fast
    mode: along a random direction; the slow test: every input entry)."""
    torch.manual_seed(0)
    layer = ConvCaps(2, 3, 3, 2, 5, Routing(3, 0.5, True)).double()  # 2x2 windows sharing a row and a column
    pose = torch.randn(1, 2, 16, 5, 5, dtype=torch.double, requires_grad=True)
    act = torch.rand(1, 2, 5, 5, dtype=torch.double, requires_grad=True)

    def f(pose: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, a, _ = layer(pose, act)
        return p, a

    assert torch.autograd.gradcheck(f, (pose, act), atol=1e-5, rtol=1e-4, fast_mode=fast)


def test_plain_votes_read_and_differentiate_as_the_cpu_buffer_does() -> None:
    """PlainVotes (GPU, torch.compile) and Votes (CPU, one in-place gradient buffer) are one function."""
    torch.manual_seed(0)
    v = torch.randn(2, 3, 4, 5, 4, 4, dtype=torch.float64)
    ra, w = torch.rand(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 32, dtype=torch.float64)
    grads = []
    for kind in (Votes, PlainVotes):
        x = v.clone().requires_grad_(True)
        vv = kind(x)
        out = (vv.sums(ra) ** 2).sum() + (vv.lin(w) ** 2).sum()
        out.backward()
        grads.append((out.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_uniform_votes_changes_the_output_and_restores() -> None:
    model, x = small(), images(2)
    with torch.no_grad():
        before = model(x)
        with model.uniform_votes():
            uniform = model(x)
        after = model(x)
    assert not torch.allclose(uniform.scores, before.scores)
    torch.testing.assert_close(uniform.coupling, torch.full_like(uniform.coupling, 0.1))  # uniform over classes
    torch.testing.assert_close(after.scores, before.scores, atol=0, rtol=0)
    with pytest.raises(RuntimeError), model.uniform_votes():
        raise RuntimeError
    assert not model.uniform


def test_spread_loss_and_margin_schedule() -> None:
    a, y = torch.tensor([[0.9, 0.5, 0.1]]), torch.tensor([0])
    # i=1: max(0, 0.5 - 0.4)^2 = 0.01; i=2: max(0, 0.5 - 0.8)^2 = 0
    torch.testing.assert_close(spread_loss(a, y, 0.5), torch.tensor([0.01]))
    model, x = small(margin_ramp_steps=10), images(1)
    out, y = model(x), torch.tensor([0])
    assert float(model.spread_margin()) == pytest.approx(0.2)
    for _ in range(5):
        model.objective(out, x, y)
    assert float(model.spread_margin()) == pytest.approx(0.55)
    model.eval()
    model.objective(out, x, y)  # evaluation does not advance the schedule
    state = model.state_dict()
    assert int(state["spread_steps"]) == 5
    resumed = small(margin_ramp_steps=10)
    resumed.load_state_dict(state)
    assert float(resumed.spread_margin()) == pytest.approx(0.55)
    resumed.spread_steps.fill_(100)
    assert float(resumed.spread_margin()) == pytest.approx(0.9)


def test_attack_interface() -> None:
    model, x = small(), images(2)
    out = model(x)
    assert resolve_loss("own", model).name == "margin"
    z = model.attack_scores(out)
    torch.testing.assert_close(z, torch.log(out.scores / (1 - out.scores)))


def test_adam_steps_lower_the_loss() -> None:
    model, x, y = small(A=4, B=4, C=4, D=4, margin_ramp_steps=0), images(4, seed=2), torch.arange(4)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(4):
        loss = model.objective(model(x), x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
