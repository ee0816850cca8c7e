"""Model properties: exact parameter counts, routing maths, losses, decoder masking."""

from __future__ import annotations

import pytest
import torch

from capsbench.core.errors import CapsbenchError
from capsbench.models import MODELS, build_model, dynamic_routing, squash

# A CapsNet with the paper's structure but small widths, so property tests take milliseconds.
TINY_CAPS = dict(conv_channels=16, primary_types=4)


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("capsnet", {}, 8_215_568),
        ("capsnet", {"reconstruction": False}, 6_804_224),
        ("cnn-paper", {}, 35_445_522),
        ("cnn-pooled", {}, 8_206_090),
    ],
)
def test_exact_parameter_counts(name, options, expected):
    assert build_model(name, **options).num_params() == expected


def test_pooled_cnn_is_within_ten_percent_of_capsnet():
    caps, pooled = build_model("capsnet").num_params(), build_model("cnn-pooled").num_params()
    assert abs(pooled - caps) / caps < 0.10


def test_capsnet_40px_has_4608_primary_capsules():
    m = build_model("capsnet", input_size=40)
    assert m.cfg.num_primary == 12 * 12 * 32
    assert m.W.shape == (4608, 10, 16, 8)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_trains_through_the_common_interface(name):
    opts = TINY_CAPS if name == "capsnet" else {}
    model = build_model(name, **opts)
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 3, 9])
    out = model(x, y)
    assert out.scores.shape == (3, 10)
    loss = model.objective(out, x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.attack_loss(out, y).shape == (3,)


def test_unknown_model_lists_known_ones():
    with pytest.raises(CapsbenchError, match="unknown model 'capsule'; known models: capsnet, .*cnn-paper, cnn-pooled, efficient-capsnet, matrix-capsnet-em"):
        build_model("capsule")


def test_unknown_and_mistyped_options_are_refused():
    with pytest.raises(CapsbenchError, match="unknown key .*routing_iterations.*routing_iters"):
        build_model("capsnet", routing_iterations=2)
    with pytest.raises(CapsbenchError, match="routing_iters: expected int"):
        build_model("capsnet", routing_iters="three")


def test_squash_norm_below_one_and_finite_gradient_at_zero():
    # Norms from 1e-3 to ~400; beyond |s| ~ 4e3, n2 / (1 + n2) rounds to exactly 1 in float32.
    s = torch.randn(1000, 16) * torch.logspace(-3, 2, 1000).unsqueeze(1)
    norms = squash(s).norm(dim=-1)
    assert (norms < 1).all()
    expected = s.norm(dim=-1) ** 2 / (1 + s.norm(dim=-1) ** 2)
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-6)
    zero = torch.zeros(2, 16, requires_grad=True)
    squash(zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_coupling_sums_to_one_over_parents(iters):
    u_hat = torch.randn(4, 50, 10, 16)
    v, c, b = dynamic_routing(u_hat, iters)
    torch.testing.assert_close(c.sum(dim=2), torch.ones(4, 50))
    assert v.shape == (4, 10, 16) and b.shape == (4, 50, 10)
    if iters == 1:  # one iteration: uniform coupling 1/10
        torch.testing.assert_close(c, torch.full_like(c, 0.1))


def test_routing_matches_a_loop_over_the_paper_procedure():
    u_hat = torch.randn(2, 7, 3, 4, dtype=torch.float64)
    v, c, _ = dynamic_routing(u_hat, 3)
    for e in range(2):  # Procedure 1, one example at a time, with explicit sums
        b = torch.zeros(7, 3, dtype=torch.float64)
        for r in range(3):
            cc = torch.softmax(b, dim=1)
            s = torch.stack([sum(cc[i, j] * u_hat[e, i, j] for i in range(7)) for j in range(3)])
            n2 = (s**2).sum(-1, keepdim=True)
            vv = n2 / (1 + n2) * s / n2.sqrt()
            b = b + torch.tensor([[float(u_hat[e, i, j] @ vv[j]) for j in range(3)] for i in range(7)], dtype=torch.float64)
        torch.testing.assert_close(v[e], vv)
        torch.testing.assert_close(c[e], cc)


def test_batch_independence():
    """An example's output is the same alone and inside a batch of 64 (routing never mixes examples)."""
    torch.manual_seed(0)
    model = build_model("capsnet", **TINY_CAPS).eval()
    x = torch.rand(64, 1, 28, 28)
    with torch.no_grad():
        batch = model(x)
        for i in (0, 17, 63):
            alone = model(x[i : i + 1])
            torch.testing.assert_close(alone.capsules[0], batch.capsules[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(alone.coupling[0], batch.coupling[i], rtol=1e-4, atol=1e-5)


def test_margin_loss_against_hand_computed_values():
    model = build_model("capsnet", **TINY_CAPS)
    lengths = torch.tensor([[0.95, 0.05, 0.5, 0.0, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0],
                            [0.30, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.95]])  # fmt: skip
    y = torch.tensor([0, 0])
    # example 0: present 0.95>=0.9 -> 0; absent: 0.5*(0.4^2 + 0.1^2) = 0.085
    # example 1: present (0.9-0.3)^2 = 0.36; absent 0.5*(0.85^2) = 0.36125
    expected = torch.tensor([0.085, 0.36 + 0.36125])
    torch.testing.assert_close(model.margin_loss(lengths, y), expected)


def test_one_margin_loss_for_one_hot_and_two_hot_targets():
    """CapsNet's loss is the shared margin_loss with a one-hot target; a two-hot target (MultiMNIST)
    is the sum of the two one-hot present terms with only the other classes absent."""
    from capsbench.models.losses import margin_loss

    model = build_model("capsnet", **TINY_CAPS, m_plus=0.8, m_minus=0.2, lambda_=0.25)
    lengths, y = torch.rand(5, 10), torch.tensor([0, 3, 9, 3, 1])
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    assert torch.equal(model.margin_loss(lengths, y), margin_loss(lengths, one_hot, 0.8, 0.2, 0.25))
    two_hot = torch.tensor([[1.0, 1.0, 0, 0]])
    l4 = torch.tensor([[0.5, 0.7, 0.3, 0.05]])  # present: 0.4^2 + 0.2^2; absent: 0.5 * 0.2^2
    assert margin_loss(l4, two_hot).item() == pytest.approx(0.16 + 0.04 + 0.5 * 0.04)


def test_reconstruction_loss_is_sum_of_squares_times_0_0005():
    model = build_model("capsnet", **TINY_CAPS)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    out = model(x, y)
    margin = model.margin_loss(out.scores, y).mean()
    sse = ((out.reconstruction - x.flatten(1)) ** 2).sum(1).mean()
    torch.testing.assert_close(model.objective(out, x, y), margin + 0.0005 * sse)


def test_decoder_masks_by_label_in_training_and_by_prediction_in_eval():
    torch.manual_seed(0)
    model = build_model("capsnet", **TINY_CAPS)
    x = torch.rand(4, 1, 28, 28)
    decoder_inputs = []
    model.decoder[0].register_forward_hook(lambda mod, inp, out: decoder_inputs.append(inp[0].view(4, 10, 16)))
    with torch.no_grad():
        pred = model.eval()(x).scores.argmax(1)
        other = (pred + 1) % 10
        model.train()(x, other)
    eval_in, train_in = decoder_inputs
    kept_eval = eval_in.abs().sum(-1) > 0  # (B, 10): which capsule reached the decoder
    kept_train = train_in.abs().sum(-1) > 0
    assert kept_eval.sum(1).tolist() == [1] * 4 and kept_eval.float().argmax(1).tolist() == pred.tolist()
    assert kept_train.sum(1).tolist() == [1] * 4 and kept_train.float().argmax(1).tolist() == other.tolist()


def test_inner_routing_grad_option_changes_gradients_not_outputs():
    torch.manual_seed(0)
    u = torch.randn(2, 20, 10, 16, requires_grad=True)
    v1, _, _ = dynamic_routing(u, 3, inner_grad=True)
    g1 = torch.autograd.grad(v1.sum(), u)[0]
    v2, _, _ = dynamic_routing(u, 3, inner_grad=False)
    g2 = torch.autograd.grad(v2.sum(), u)[0]
    torch.testing.assert_close(v1, v2)
    assert not torch.allclose(g1, g2)
