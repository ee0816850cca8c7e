"""The CPU fast paths compute the same function as the plain ones: spectral PrimaryCaps vs
F.conv2d, parent-major routing (hand-written backward) vs autograd through the plain routing,
chunked routing vs whole-batch routing, the inference weight-spectra cache, and the allocator
switch. Float64 comparisons are tight (the paths are exact in exact arithmetic);
fp32 ones are loose by the rounding of different summation orders."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from capsbench.core.errors import CapsbenchError
from capsbench.attacks import APGD, FGSM, PGD, ReconstructiveAttack, Square, TargetedFGSM
from capsbench.models import build_model
from capsbench.models.base import fast_input_grads
from capsbench.models.routing import dynamic_routing, parent_major_routing
from capsbench.models.spectral import frequencies, spectral_primary, supports

TINY = dict(conv_channels=16, primary_types=4, decoder_hidden=(32, 64))


def routing_matters(model: nn.Module) -> nn.Module:
    """W scaled up from its 0.01 initialisation, at which predictions are so small that every
    routing iteration gives the same couplings: so 1 and 3 iterations really differ."""
    with torch.no_grad():
        model.W.mul_(100)
    return model


def pair(**options) -> tuple[nn.Module, nn.Module]:
    """The same weights with the direct and the spectral PrimaryCaps, whole-batch routing."""
    torch.manual_seed(0)
    direct = routing_matters(build_model("capsnet", primary_conv="direct", routing_chunk=0, **TINY, **options))
    spectral = build_model("capsnet", primary_conv="spectral", routing_chunk=0, **TINY, **options)
    spectral.load_state_dict(direct.state_dict())
    return direct, spectral


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = model(x, y)
    model.zero_grad()
    model.objective(out, x, y).backward()
    return out, {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


def test_frequency_set_covers_the_spectrum_once():
    for n in (10, 16):  # 28x28 and 40x40 inputs
        freqs = frequencies(n)
        assert sum(m for *_, m in freqs) == n * n  # every frequency once, conjugate pairs counted twice
        seen = {(k1, k2) for k1, k2, _ in freqs}
        for k1, k2, m in freqs:  # a pair's partner is never listed itself
            partner = ((-k1) % n, (-k2) % n)
            assert (partner == (k1, k2)) == (m == 1) and (m == 1 or partner not in seen)


@pytest.mark.parametrize("size", [28, 40])
def test_spectral_primary_equals_the_convolutions_in_float64(size):
    torch.manual_seed(1)
    conv1, primary = nn.Conv2d(1, 8, 9).double(), nn.Conv2d(8, 12, 9, stride=2).double()
    x = torch.rand(3, 1, size, size, dtype=torch.float64, requires_grad=True)
    ref = primary(F.relu(conv1(x)))
    out = spectral_primary(x, conv1, primary)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    inputs = [x, conv1.weight, conv1.bias, primary.weight, primary.bias]
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_supports_only_the_shapes_it_is_built_for():
    assert supports(20, 9, 2) and supports(32, 9, 2)
    assert not supports(21, 9, 2) and not supports(20, 7, 2) and not supports(20, 9, 1) and not supports(8, 9, 2)


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("reconstruction", [True, False])
def test_spectral_capsnet_matches_direct_in_fp32(iters, reconstruction):
    direct, spectral = pair(routing_iters=iters, reconstruction=reconstruction)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    out_d, g_d = grads(direct.train(), x, y)
    out_s, g_s = grads(spectral.train(), x, y)
    torch.testing.assert_close(out_s.scores, out_d.scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out_s.coupling, out_d.coupling, rtol=1e-4, atol=1e-6)
    if reconstruction:
        torch.testing.assert_close(out_s.reconstruction, out_d.reconstruction, rtol=1e-4, atol=1e-6)
    assert g_s.keys() == g_d.keys()
    for name in g_d:  # relative to the largest entry: tiny gradients carry the rounding of both paths
        scale = g_d[name].abs().max()
        torch.testing.assert_close(g_s[name] / scale, g_d[name] / scale, rtol=0, atol=1e-4, msg=name)


def test_chunked_routing_equals_whole_batch_routing_and_keeps_examples_apart():
    torch.manual_seed(0)
    whole = build_model("capsnet", routing_chunk=0, primary_conv="direct", **TINY).train()
    chunked = build_model("capsnet", routing_chunk=3, primary_conv="direct", **TINY).train()
    chunked.load_state_dict(whole.state_dict())
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    out_w, g_w = grads(whole, x, y)
    out_c, g_c = grads(chunked, x, y)
    for field in ("scores", "capsules", "coupling", "routing_logits", "reconstruction"):
        torch.testing.assert_close(getattr(out_c, field), getattr(out_w, field), rtol=1e-5, atol=1e-6)
    for name in g_w:
        torch.testing.assert_close(g_c[name], g_w[name], rtol=1e-4, atol=1e-7, msg=name)
    chunked.eval()
    with torch.no_grad():  # an example's result does not depend on its chunk-mates
        alone = chunked(x[5:6]).capsules
        other = chunked(torch.cat([torch.rand(4, 1, 28, 28), x[5:6], torch.rand(2, 1, 28, 28)])).capsules[4:5]
    torch.testing.assert_close(alone, other, rtol=1e-5, atol=1e-6)
    c = chunked.eval()(x).coupling
    torch.testing.assert_close(c.sum(2), torch.ones(c.shape[:2]), rtol=0, atol=1e-5)


def test_inference_spectra_cache_follows_the_weights():
    direct, spectral = pair()
    direct.eval(), spectral.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        first = spectral(x).scores
        assert spectral._spectra is not None  # computed once, kept for the next call
        torch.testing.assert_close(spectral(x).scores, first, rtol=0, atol=0)
        for m in (direct, spectral):
            m.primary.weight.mul_(1.5)  # an in-place update, as an optimizer step makes
        changed = spectral(x).scores
        torch.testing.assert_close(changed, direct(x).scores, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(changed, first)
        spectral.load_state_dict(build_model("capsnet", **TINY).state_dict())
        direct.load_state_dict(spectral.state_dict())
        torch.testing.assert_close(spectral(x).scores, direct(x).scores, rtol=1e-4, atol=1e-6)
    with torch.enable_grad():
        spectral(x)  # a recorded forward (an attack) recomputes in the graph and drops the cache
    assert spectral._spectra is None


def test_auto_picks_spectral_on_a_cpu_and_direct_for_input_gradients_or_other_autocast():
    model = build_model("capsnet", **TINY).eval()
    x = torch.rand(2, 1, 28, 28)
    assert model.use_spectral(x)
    assert not model.use_spectral(x.clone().requires_grad_())  # attacks: the library convolution
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.use_spectral(x)  # CPU bf16 training and inference: bf16 products
        assert not model.use_spectral(x.clone().requires_grad_())  # no bf16 fast path for attacks
        with fast_input_grads(model):
            assert not model.use_spectral(x.clone().requires_grad_())
    with torch.autocast("cpu", dtype=torch.float16):
        assert not model.use_spectral(x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_spectral_under_bf16_autocast_rounds_like_a_bf16_convolution():
    """Outputs and weight gradients of the bf16 spectral path are as close to the fp32
    convolution as autocast's own bf16 convolution is (both about 0.5% of the norm), and the
    bf16 products are really taken (the error is far above fp32 rounding)."""
    direct, spectral = pair()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    ref, ref_grads = grads(direct, x, y)
    conv = lambda m, inp: m.primary(F.relu(m.conv1(inp)))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = spectral_primary(x, spectral.conv1, spectral.primary)
        library = conv(direct, x)
        out, fast_grads = grads(spectral, x, y)
    exact = conv(direct, x)
    assert fast.dtype == torch.float32 and 1e-4 < rel_err(fast, exact) < 2 * rel_err(library, exact) + 1e-3
    assert rel_err(out.scores, ref.scores) < 2e-2
    for name in ("primary.weight", "conv1.weight", "W"):
        assert rel_err(fast_grads[name], ref_grads[name]) < 5e-2, name


@pytest.mark.parametrize("training", [True, False])
def test_auto_precision_trains_in_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, training):
    from capsbench.core import device as dev

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(dev, "native_bf16_cpu", lambda native=native: native)
        assert dev.amp_dtype(cpu, "auto", training) == (torch.bfloat16 if training and native else None)
        assert dev.amp_dtype(cuda, "auto", training) == torch.bfloat16
        assert dev.amp_dtype(cpu, "fp32", training) is None and dev.amp_dtype(cpu, "off", training) is None
        assert dev.amp_dtype(cpu, "bf16", training) == torch.bfloat16


def test_training_precision_enters_the_cache_key_and_evaluation_stays_fp32(monkeypatch):
    from types import SimpleNamespace

    from capsbench.core import device as dev
    from capsbench.train.cache import cache_key
    from capsbench.train.config import TrainConfig
    from capsbench.train.tasks import MnistTask

    cfg, cpu = TrainConfig(steps=2), torch.device("cpu")
    images, labels = torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    data = SimpleNamespace(train_x=images, train_y=labels, test_x=images, test_y=labels)
    keys = {}
    for native in (True, False):
        monkeypatch.setattr(dev, "native_bf16_cpu", lambda native=native: native)
        keys[native] = cache_key("capsnet", {}, cfg, cpu)
        task = MnistTask(cfg, data, cpu)
        assert task.dtype == (torch.bfloat16 if native else None) and task.eval_dtype is None
    assert keys[True] != keys[False]


@pytest.mark.parametrize("iters", [1, 2, 3])
@pytest.mark.parametrize("inner_grad", [True, False])
def test_parent_major_routing_equals_plain_routing_in_float64(iters, inner_grad):
    torch.manual_seed(iters)
    u_hat = torch.randn(3, 20, 4, 5, dtype=torch.float64, requires_grad=True)  # (B, N, C, D)
    ref = dynamic_routing(u_hat, iters, inner_grad)
    parent_major = u_hat.detach().transpose(1, 2).contiguous().requires_grad_()  # (B, C, N, D)
    out = parent_major_routing(parent_major, iters, inner_grad)
    for a, b in zip(out, ref):  # v, coupling, logits
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    gv, gc, gb = (torch.randn_like(t) for t in ref)  # the coupling and logits are outputs too
    loss = lambda v, c, b: (v * gv).sum() + (c * gc).sum() + (b * gb).sum()  # noqa: E731
    g_ref = torch.autograd.grad(loss(*ref), u_hat)[0]
    g_out = torch.autograd.grad(loss(*out), parent_major)[0]
    torch.testing.assert_close(g_out.transpose(1, 2), g_ref, rtol=0, atol=1e-12)


def test_parent_major_routing_backward_passes_gradcheck():
    torch.manual_seed(0)
    u_hat = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: parent_major_routing(u, 3), (u_hat,))


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("reconstruction", [True, False])
def test_parent_major_capsnet_matches_plain_in_fp32(iters, reconstruction):
    torch.manual_seed(0)
    plain = build_model("capsnet", routing_impl="plain", routing_iters=iters, reconstruction=reconstruction, **TINY)
    fast = build_model("capsnet", routing_impl="parent-major", routing_iters=iters, reconstruction=reconstruction,
                       **TINY)  # fmt: skip
    fast.load_state_dict(routing_matters(plain).state_dict())
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    out_p, g_p = grads(plain.train(), x, y)
    out_f, g_f = grads(fast.train(), x, y)
    for field in ("scores", "capsules", "coupling", "routing_logits", "reconstruction"):
        if getattr(out_p, field) is not None:
            torch.testing.assert_close(getattr(out_f, field), getattr(out_p, field), rtol=1e-5, atol=1e-6)
    for name in g_p:
        scale = g_p[name].abs().max()
        torch.testing.assert_close(g_f[name] / scale, g_p[name] / scale, rtol=0, atol=1e-5, msg=name)
    fast.eval()
    with torch.no_grad():  # an example's result does not depend on its batch-mates
        alone = fast(x[2:3]).capsules
        other = fast(torch.cat([torch.rand(3, 1, 28, 28), x[2:3]])).capsules[3:4]
    torch.testing.assert_close(alone, other, rtol=1e-5, atol=1e-6)


def test_auto_routing_is_parent_major_only_on_the_cpu_fast_path():
    model = build_model("capsnet", **TINY).eval()
    x = torch.rand(2, 1, 28, 28)
    assert model.use_parent_major(x)
    assert not model.use_parent_major(x.clone().requires_grad_())  # attacks: autograd's routing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.use_parent_major(x)  # routing in fp32 under CPU bf16 autocast
        assert not model.use_parent_major(x.clone().requires_grad_())
    assert not build_model("capsnet", routing_impl="plain", **TINY).use_parent_major(x)
    assert build_model("capsnet", routing_impl="parent-major", **TINY).use_parent_major(x.clone().requires_grad_())


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient (B, 1, S, S) of the summed margin loss with respect to the input, parameters frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    x = x.clone().requires_grad_()
    return torch.autograd.grad(model.margin_loss(model(x).scores, y).sum(), x)[0]


@pytest.mark.parametrize("reconstruction", [True, False])
def test_fast_input_gradients_match_the_plain_ones(reconstruction):
    """Iterative attacks take the fast paths for input gradients (``fast_input_grads``): the same
    gradient as the direct convolution and autograd's routing, up to fp32 rounding."""
    model = routing_matters(build_model("capsnet", reconstruction=reconstruction, **TINY)).eval()
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    plain = input_grad(model, x, y)
    with fast_input_grads(model):
        assert model.use_spectral(x.clone().requires_grad_()) and model.use_parent_major(x.clone().requires_grad_())
        fast = input_grad(model, x, y)
    assert not model.allow_fast_input_grads  # restored
    scale = plain.abs().max()
    assert scale > 0
    torch.testing.assert_close(fast / scale, plain / scale, rtol=0, atol=1e-5)
    # Exactly zero where the direct convolution's is (the last row and column, and pixels only
    # dead Conv1 units see), so no sign of rounding noise for an attack to follow.
    assert (plain[..., -1, :] == 0).all() and (plain[..., :, -1] == 0).all()
    assert torch.equal(fast == 0, plain == 0)
    assert torch.equal(fast.sign(), plain.sign())


def spy_paths(model: nn.Module) -> list[bool]:
    """Record, for every forward whose input needs a gradient, whether it took the spectral path."""
    seen: list[bool] = []
    use = model.use_spectral

    def spy(x: torch.Tensor) -> bool:
        fast = use(x)
        if x.requires_grad:
            seen.append(fast)
        return fast

    model.use_spectral = spy
    return seen


def test_iterative_attacks_take_the_fast_paths_single_step_attacks_the_plain_ones():
    torch.manual_seed(0)
    model = build_model("capsnet", **TINY).eval()
    seen = spy_paths(model)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for attack in (FGSM(model, 0.1), TargetedFGSM(model, 0.1)):
        attack(x, y, target=(y + 1) % 10)
    assert seen and not any(seen)  # FGSM moves near-zero-gradient pixels by eps: exact signs
    seen.clear()
    for attack in (PGD(model, 0.1, steps=2), APGD(model, 0.1, steps=2), ReconstructiveAttack(model, 0.1, steps=2)):
        attack(x, y)
    assert seen and all(seen)
    Square(model, 0.1, queries=2)(x, y)  # forwards only: the fast paths as before
    assert not model.allow_fast_input_grads


@pytest.mark.parametrize(("options", "message"), [
    ({"routing_impl": "einsum"}, "routing_impl must be one of auto, plain, parent-major"),
    ({"primary_conv": "fft"}, "primary_conv must be one of auto, direct, spectral"),
    ({"primary_conv": "spectral", "input_size": 29}, "needs an even Conv1 output"),
    ({"routing_chunk": -1}, "routing_chunk must be >= 0"),
])  # fmt: skip
def test_bad_fast_path_options_are_refused(options, message):
    # vocabulary and bounds: the config's CapsbenchError; shape rules: the constructor's ValueError
    with pytest.raises((CapsbenchError, ValueError), match=message):
        build_model("capsnet", **TINY, **options)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_is_on_by_default_and_can_be_turned_off():
    code = ("from capsbench.core.allocator import tune_cpu_allocator, cpu_allocator_tuned; "
            "print(tune_cpu_allocator(), cpu_allocator_tuned())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "CAPSBENCH_CPU_ALLOCATOR"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "CAPSBENCH_CPU_ALLOCATOR": "default"},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert on.stdout.split() == ["True", "True"] and off.stdout.split() == ["False", "False"]
