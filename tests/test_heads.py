"""CapsNet's routing heads (models/heads), each on tiny inputs on the CPU: couplings, batch
independence, gradients, exact parameter counts, the uniform-vote surrogate, the cache key."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from capsbench.core.config import from_dict, opt, weight_fields
from capsbench.core.errors import CapsbenchError
from capsbench.models import MODELS, build_model, weight_options
from capsbench.models.heads import HEADS, HeadSpec, build_head
from capsbench.models.routing import dynamic_routing
from tests.conftest import adam_losses

# The paper's structure with small widths: 4 capsule types on the 6x6 grid, N = 144 children.
TINY = dict(conv_channels=16, primary_types=4, decoder_hidden=(32, 64))
HEAD_MODELS = {MODELS.meta(n)["defaults"]["routing"]: n for n in MODELS.names() if "defaults" in MODELS.meta(n)}
# The paper CapsNet at 28x28 outside the votes and the head: Conv1 + PrimaryCaps + decoder.
OUTSIDE_HEAD = 20_992 + 5_308_672 + 1_411_344


def tiny(routing: str, seed: int = 0, **options) -> torch.nn.Module:
    """A tiny CapsNet with W scaled up from 0.01, so that routing really changes the couplings."""
    torch.manual_seed(seed)
    model = build_model("capsnet", routing=routing, **TINY, **options)
    with torch.no_grad():
        model.W.mul_(30)
    return model


def images(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("routing", HEADS.names())
def test_couplings_sum_to_one_and_lengths_are_scores(routing):
    model = tiny(routing).eval()
    x, _ = images(5)
    with torch.no_grad():
        out = model(x)
    assert out.capsules.shape == (5, 10, 16) and torch.isfinite(out.capsules).all()
    assert ((out.scores >= 0) & (out.scores < 1)).all()
    assert model.routes == (out.coupling is not None)
    if out.coupling is not None:
        assert out.coupling.shape == (5, model.cfg.num_primary, 10)
        torch.testing.assert_close(out.coupling.sum(2), torch.ones(5, model.cfg.num_primary), rtol=0, atol=1e-5)
    else:
        assert out.routing_logits is None


@pytest.mark.parametrize("routing", HEADS.names())
def test_an_example_is_routed_the_same_alone_and_in_a_batch(routing):
    model = tiny(routing, routing_chunk=3).eval()  # chunks of 3: the example shares a chunk with others
    x, _ = images(6)
    with torch.no_grad():
        alone = model(x[4:5])
        batch = model(x)
    torch.testing.assert_close(batch.capsules[4:5], alone.capsules, rtol=1e-5, atol=1e-5)
    if alone.coupling is not None:
        torch.testing.assert_close(batch.coupling[4:5], alone.coupling, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", HEADS.names())
def test_every_parameter_gets_a_finite_gradient(routing):
    model = tiny(routing).train()
    x, y = images(4)
    loss = model.objective(model(x, y), x, y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.W.grad.abs().sum() > 0


@pytest.mark.parametrize("routing", HEADS.names())
def test_zero_votes_keep_finite_gradients(routing):
    """All-zero votes and children (squash, |mu|, |pose| and the variances at 0)."""
    spec = HeadSpec(144, 10, 16, 8, layout=(4, 6))
    head = build_head(routing, spec)
    n = head.num_children
    u_hat, u = torch.zeros(2, n, 10, 16, requires_grad=True), torch.zeros(2, n, 8, requires_grad=True)
    v = head(u_hat, u).v
    (v.sum() + (v * v).sum()).backward()
    assert torch.isfinite(v).all() and torch.isfinite(u_hat.grad).all()
    assert all(t.grad is None or torch.isfinite(t.grad).all() for t in (u, *head.parameters()))


@pytest.mark.parametrize("routing", HEADS.names())
def test_head_gradients_pass_gradcheck(routing):
    """Each head's backward (autograd's, through every iteration) in float64, small shapes."""
    torch.manual_seed(0)
    head = build_head(routing, HeadSpec(8, 3, 4, 2, iters=2, layout=(2, 2))).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)  # away from the zero initialisation, so every path is exercised
    u = torch.randn(2, 8, 2, dtype=torch.float64, requires_grad=True)
    u_hat = torch.randn(2, head.num_children, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: head(a, head.child_capsules(b)).v, (u_hat, u), fast_mode=True)


EXPECTED_PARAMS = {  # the paper CapsNet at 28x28 with each head: the counts the heads' docstrings derive
    "dynamic": 8_215_568, "uniform": 8_215_568, "em": 8_215_588, "self": 8_319_248,
    "attention": 8_227_088, "max-pool": 6_781_968, "avg-pool": 6_781_968,
}  # fmt: skip


def test_every_head_has_a_registered_model_and_an_expected_count():
    assert set(HEAD_MODELS) | {"dynamic"} == set(HEADS.names()) == set(EXPECTED_PARAMS)
    assert MODELS.meta("capsnet").get("defaults") is None  # capsnet stays dynamic


@pytest.mark.parametrize("routing", sorted(EXPECTED_PARAMS))
def test_parameter_count_is_the_docstrings_formula(routing):
    name = HEAD_MODELS.get(routing, "capsnet")
    model = build_model(name)
    head, cfg = model.head, model.cfg
    votes = head.num_children * cfg.num_classes * cfg.class_dim * cfg.primary_dim
    assert model.num_params() == OUTSIDE_HEAD + votes + head.own_params(head.spec) == EXPECTED_PARAMS[routing]
    assert sum(p.numel() for p in head.parameters()) == head.own_params(head.spec)
    assert f"{EXPECTED_PARAMS[routing]:,}" in sys.modules[type(head).__module__].__doc__


@pytest.mark.parametrize("routing", ["dynamic", "em", "self", "attention"])
def test_uniform_votes_is_the_uniform_model_on_the_same_weights(routing):
    model = tiny(routing).eval()
    uniform = build_model("capsnet-uniform", **TINY).eval()
    uniform.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
    x, _ = images(4)
    with torch.no_grad():
        own = model(x)
        with model.uniform_votes():
            surrogate = model(x)
        expected = uniform(x)
        for field in ("scores", "capsules", "coupling", "reconstruction"):
            torch.testing.assert_close(getattr(surrogate, field), getattr(expected, field), rtol=1e-6, atol=1e-7)
        with pytest.raises(RuntimeError, match="inside"), model.uniform_votes():
            raise RuntimeError("inside")
        torch.testing.assert_close(model(x).capsules, own.capsules, rtol=0, atol=0)  # the head is back
    if routing == "dynamic":
        assert not torch.allclose(own.capsules, expected.capsules)  # routing with W x 30 does change them


def test_uniform_head_is_one_iteration_of_dynamic_routing():
    u_hat = torch.randn(3, 20, 10, 16)
    head = build_head("uniform", HeadSpec(20, 10, 16, 8))
    v, c, _ = dynamic_routing(u_hat, 1)
    out = head(u_hat, torch.randn(3, 20, 8))
    torch.testing.assert_close(out.v, v) and torch.testing.assert_close(out.c, c)


def test_attention_logits_are_the_row_sums_of_the_pairwise_agreements():
    u_hat = torch.randn(2, 12, 10, 16, dtype=torch.float64)
    head = build_head("attention", HeadSpec(12, 10, 16, 8)).double()
    pairwise = torch.einsum("bijd,bkjd->bjik", u_hat, u_hat) / 4  # (B, C, N, N), / sqrt(16)
    torch.testing.assert_close(head(u_hat, torch.randn(2, 12, 8)).b, pairwise.sum(-1).transpose(1, 2))


@pytest.mark.parametrize(("routing", "reduce"), [("max-pool", torch.amax), ("avg-pool", torch.mean)])
def test_pooling_heads_pool_each_type_over_its_grid(routing, reduce):
    head = build_head(routing, HeadSpec(4 * 36, 10, 16, 8, layout=(4, 6)))
    u = torch.randn(2, 4 * 36, 8)  # capsule index = (type, row, col)
    expected = torch.stack([reduce(u[:, 36 * t : 36 * (t + 1)], dim=1) for t in range(4)], dim=1)
    assert head.num_children == 4 and not head.routes
    torch.testing.assert_close(head.child_capsules(u), expected)


def test_em_and_self_routing_lengths_are_the_parent_activations():
    x, _ = images(3)
    with torch.no_grad():
        em = tiny("em").eval()(x).scores
        sr = tiny("self").eval()(x).scores
    assert ((em > 0) & (em < 1)).all()
    torch.testing.assert_close(sr.sum(1), torch.ones(3), rtol=0, atol=1e-4)  # sum_j a_j = 1


def test_parent_major_only_for_dynamic_routing():
    x, _ = images(2)
    assert tiny("dynamic").use_parent_major(x)
    assert not any(tiny(r).use_parent_major(x) for r in HEADS.names() if r != "dynamic")


def test_unknown_routing_is_refused_with_the_known_heads():
    message = rf"model capsnet\.routing: unknown routing head 'nonsense'; known heads: {', '.join(HEADS.names())}$"
    with pytest.raises(CapsbenchError, match=message):
        build_model("capsnet", routing="nonsense")


# The cache key of a CapsNet before routing heads existed: it must not change.
CAPSNET_KEY = {
    "input_size": 28, "in_channels": 1, "num_classes": 10, "conv_channels": 256, "primary_types": 32,
    "primary_dim": 8, "class_dim": 16, "routing_iters": 3, "reconstruction": True, "inner_routing_grad": True,
    "recon_weight": 0.0005, "decoder_hidden": (512, 1024), "m_plus": 0.9, "m_minus": 0.1, "lambda_": 0.5,
}  # fmt: skip


def test_dynamic_capsnet_keeps_its_cache_key_and_state_dict_keys():
    assert weight_options("capsnet", {}) == CAPSNET_KEY == weight_options("capsnet", {"routing": "dynamic"})
    assert weight_options("capsnet-em", {}) == {**CAPSNET_KEY, "routing": "em"}
    assert weight_options("capsnet", {"routing": "self"})["routing"] == "self"
    keys = set(build_model("capsnet", **TINY).state_dict())
    assert keys == {"W", "conv1.weight", "conv1.bias", "primary.weight", "primary.bias"} | {
        f"decoder.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}  # fmt: skip


def test_registry_defaults_sit_under_the_users_options():
    assert build_model("capsnet-em", **TINY).cfg.routing == "em"
    assert build_model("capsnet-em", routing="uniform", **TINY).cfg.routing == "uniform"


def test_keyed_unless_default_enters_the_key_only_when_set():
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        a: int = 1
        b: str = opt("x", keyed="unless-default")
        c: int = opt(0, in_key=False)

    assert weight_fields(Cfg()) == {"a": 1}
    assert weight_fields(from_dict(Cfg, {"b": "y", "c": 3})) == {"a": 1, "b": "y"}


@pytest.mark.parametrize("routing", HEADS.names())
def test_a_few_training_steps_lower_the_loss(routing):
    torch.manual_seed(0)
    model = build_model("capsnet", routing=routing, **TINY).train()
    x, y = images(8)
    losses = adam_losses(model, x, y, steps=4, lr=2e-3)
    assert losses[-1] < losses[0], losses
