"""The optimized training step computes the plain eager step's function.

The GPU path is torch.compile of forward + loss, bf16 autocast and channels_last convolutions;
here each is checked on the CPU against the plain eager fp32 step, for 1 and 3 routing
iterations, with and without reconstruction. Stated tolerances:

- fp32 (compile, channels_last): loss within 1e-6 relative, every gradient within 1e-5 of its
  largest entry (the paths differ only in summation order);
- bf16 autocast (8 significant bits): scores within 0.03, the loss within 1% and every
  gradient within 15% in relative norm (measured over 5 batches: loss 0.1%, gradients up to
  3.5% with 1 routing iteration and 8% with 3, whose agreement products compound the rounding).

Most compiled tests use the aot_eager backend: dynamo's graph capture and AOTAutograd's
forward/backward split, which inductor compiles, without inductor's code generation (seconds
instead of a minute per graph); one slow test runs inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from capsbench.core.config import from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.models import MODELS, ModelOutput, build_model
from capsbench.train.config import TrainConfig
from capsbench.train.step import CompileOrEager, InferStep, StepOptions, TrainStep, to_channels_last

CPU = torch.device("cpu")
TINY = dict(conv_channels=16, primary_types=4, decoder_hidden=(32, 64))
# The formulation a GPU runs (cuDNN convolutions, autograd through the plain routing).
GPU_FORM = dict(primary_conv="direct", routing_impl="plain")


def capsnet(iters: int = 3, reconstruction: bool = True, **options) -> nn.Module:
    """A tiny CapsNet whose routing matters: W scaled up from its 0.01 initialisation, at which
    the predictions are so small that every routing iteration gives the same couplings."""
    torch.manual_seed(0)
    model = build_model("capsnet", routing_iters=iters, reconstruction=reconstruction, **TINY, **options)
    with torch.no_grad():
        model.W.mul_(100)
    return model


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def one_step(model: nn.Module, options: StepOptions, x: torch.Tensor, y: torch.Tensor):
    """(loss, correct, {name: gradient}, step) after one TrainStep of a copy of ``model``."""
    m = copy.deepcopy(model).train()
    step = TrainStep(m, torch.optim.Adam(m.parameters(), lr=1e-3), options)
    loss, correct = step(x, y)
    return loss, correct, {n: p.grad.clone() for n, p in m.named_parameters()}, step


def assert_grads_close(got: dict, ref: dict, rel: float, norm: bool = False) -> None:
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        if norm:  # relative error of the whole gradient tensor
            err = ((got[name] - g).norm() / g.norm()).item()
            assert err <= rel, f"{name}: relative gradient error {err:.4f} > {rel}"
        else:
            scale = g.abs().max()
            torch.testing.assert_close(got[name] / scale, g / scale, rtol=0, atol=rel, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("reconstruction", [True, False])
def test_compiled_channels_last_fp32_step_matches_the_eager_step(iters, reconstruction):
    model, (x, y) = capsnet(iters, reconstruction, **GPU_FORM), batch()
    loss, correct, grads, _ = one_step(model, StepOptions(CPU), x, y)
    fast = StepOptions(CPU, compile=True, channels_last=True, backend="aot_eager")
    loss_f, correct_f, grads_f, step = one_step(model, fast, x, y)
    assert step.compiled and step.failure == ""
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=0)
    assert correct_f == correct
    assert_grads_close(grads_f, grads, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("reconstruction", [True, False])
def test_bf16_compiled_step_matches_the_fp32_eager_step_loosely(iters, reconstruction):
    model, (x, y) = capsnet(iters, reconstruction, **GPU_FORM), batch()
    loss, _, grads, _ = one_step(model, StepOptions(CPU), x, y)
    fast = StepOptions(CPU, torch.bfloat16, compile=True, channels_last=True, backend="aot_eager")
    loss_b, _, grads_b, step = one_step(model, fast, x, y)
    assert step.compiled and loss_b.dtype == torch.float32  # the loss is reduced in fp32
    torch.testing.assert_close(loss_b, loss, rtol=0.01, atol=0)
    assert_grads_close(grads_b, grads, 0.15, norm=True)
    with torch.no_grad():
        ref = model.eval()(x).scores
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).scores
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=0.03)


def test_routing_iterations_change_the_function_these_tests_compare():
    """Guards the tests above: with W scaled up, 1 and 3 iterations give different results."""
    x, _ = batch()
    with torch.no_grad():
        one, three = capsnet(1).eval()(x), capsnet(3).eval()(x)
    assert (one.scores - three.scores).abs().max() > 1e-3
    assert (one.coupling - three.coupling).abs().max() > 1e-3


@pytest.mark.parametrize("options", [{}, GPU_FORM], ids=["cpu-fast-paths", "gpu-form"])
def test_compiled_inference_keeps_the_routing_properties(options):
    """Compiled bf16 inference: couplings sum to 1 over the parents, class capsules are shorter
    than 1, and an example's output does not depend on its batch-mates."""
    model = capsnet(**options).eval()
    step = InferStep(model, StepOptions(CPU, torch.bfloat16, compile=True, backend="aot_eager"))
    x, _ = batch(6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    c = out.coupling.float()
    torch.testing.assert_close(c.sum(2), torch.ones(c.shape[:2]), rtol=0, atol=1e-3)
    assert (out.scores < 1).all() and out.scores.isfinite().all()
    alone = step(x[2:3]).float()
    mates = torch.cat([torch.rand(3, 1, 28, 28), x[2:3], torch.rand(4, 1, 28, 28)])
    mixed = step(mates)[3:4].float()
    assert step.compiled
    torch.testing.assert_close(mixed, alone, rtol=0, atol=2e-2)
    torch.testing.assert_close(step(x).float(), out.scores.float(), rtol=0, atol=2e-2)


@pytest.mark.slow
def test_compiled_cpu_fast_paths_match_eager_exactly_enough():
    """The CPU's spectral PrimaryCaps and parent-major routing (a custom autograd Function)
    survive graph capture, with their transforms as graph constants (not traced)."""
    model, (x, y) = capsnet(), batch()
    loss, _, grads, _ = one_step(model, StepOptions(CPU), x, y)
    loss_c, _, grads_c, step = one_step(model, StepOptions(CPU, compile=True, backend="aot_eager"), x, y)
    assert step.compiled
    torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=0)
    assert_grads_close(grads_c, grads, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_and_loss_capture_as_one_graph(name):
    """No graph breaks in any registered model's GPU formulation under bf16 autocast: the whole
    forward + loss is one graph, which CUDA graphs can replay as one launch."""
    options = GPU_FORM if name == "capsnet" else {}
    torch.manual_seed(0)
    torch._dynamo.reset()  # a fresh cache per model: the shared code objects would hit the recompile limit
    model = build_model(name, **options)
    step = TrainStep(model, torch.optim.Adam(model.parameters()), StepOptions(CPU))
    graph = torch.compile(step.forward_loss, fullgraph=True, backend="aot_eager")  # raises on a graph break
    x, y = batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, out = graph(x, y)
    assert loss.isfinite() and out.scores.shape == (2, 10)


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager():
    """torch.compile with inductor (C++ code generation on the CPU), the whole step."""
    model, (x, y) = capsnet(**GPU_FORM), batch(4)
    loss, _, grads, _ = one_step(model, StepOptions(CPU), x, y)
    loss_c, _, grads_c, step = one_step(model, StepOptions(CPU, compile=True), x, y)
    if not step.compiled:
        pytest.skip(f"torch.compile unavailable here: {step.failure}")
    torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=0)
    assert_grads_close(grads_c, grads, 1e-4)


def test_a_loss_hook_replaces_the_objective_and_multi_label_hits_count_both():
    """TrainStep's loss hook (MultiMNIST's) gets the whole batch; the default hook is the model's
    objective; for (B, 2) labels the step counts images whose two highest scores are the labels."""
    from capsbench.train.step import hits, objective

    model, (x, y) = capsnet(), batch(4)
    loss, correct, grads, _ = one_step(model, StepOptions(CPU), x, y)
    seen = []

    def hook(m, b):
        seen.append(len(b))
        return objective(m, b[:2])

    loss_h, correct_h, grads_h, step = one_step_with(model, StepOptions(CPU), hook, x, y, torch.zeros(4))
    assert seen == [3] and torch.equal(loss_h, loss) and correct_h == correct
    assert_grads_close(grads_h, grads, 0.0)
    out = ModelOutput(torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.1, 0.8], [0.1, 0.2, 0.3]]))
    assert hits(out, torch.tensor([[1, 0], [0, 1], [2, 1]])).item() == 2
    assert hits(out, torch.tensor([0, 2, 2])).item() == 2


def one_step_with(model: nn.Module, options: StepOptions, loss, *batch_: torch.Tensor):
    m = copy.deepcopy(model).train()
    step = TrainStep(m, torch.optim.Adam(m.parameters(), lr=1e-3), options, loss)
    out_loss, correct = step(*batch_)
    return out_loss, correct, {n: p.grad.clone() for n, p in m.named_parameters()}, step


def test_channels_last_converts_only_convolution_weights_in_place():
    model = build_model("capsnet", **TINY)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    to_channels_last(model)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.primary.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.W.is_contiguous()  # (N, C, 16, 8) is not an image
    for n, p in model.named_parameters():
        assert p is params[n]  # the same Parameter objects: an optimizer made before still holds them
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


def test_channels_last_cnn_matches():
    torch.manual_seed(0)
    model = build_model("cnn-pooled", dropout=0.0)
    x, y = batch()
    loss, _, grads, _ = one_step(model, StepOptions(CPU), x, y)
    loss_n, _, grads_n, _ = one_step(model, StepOptions(CPU, channels_last=True), x, y)
    torch.testing.assert_close(loss_n, loss, rtol=1e-6, atol=0)
    assert_grads_close(grads_n, grads, 1e-5)


def test_cuda_graphs_only_in_their_modes_and_only_on_a_gpu():
    cuda = torch.device("cuda")
    assert StepOptions(cuda, compile=True, compile_mode="reduce-overhead").cudagraphs
    assert StepOptions(cuda, compile=True, compile_mode="max-autotune").cudagraphs
    assert not StepOptions(cuda, compile=True, compile_mode="max-autotune-no-cudagraphs").cudagraphs
    assert not StepOptions(cuda, compile=False, compile_mode="reduce-overhead").cudagraphs
    assert not StepOptions(CPU, compile=True, compile_mode="reduce-overhead").cudagraphs


def test_compile_failure_falls_back_to_eager_with_one_notice(monkeypatch, capsys):
    def broken_compile(fn, **_):
        def call(*a, **k):
            raise RuntimeError("no C compiler found\nlong details")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, (x, y) = capsnet(**GPU_FORM), batch(4)
    loss, _, grads, _ = one_step(model, StepOptions(CPU), x, y)
    loss_f, _, grads_f, step = one_step(model, StepOptions(CPU, compile=True), x, y)
    assert not step.compiled and step.failure == "RuntimeError: no C compiler found"
    torch.testing.assert_close(loss_f, loss, rtol=0, atol=0)  # the eager step, exactly
    assert_grads_close(grads_f, grads, 0.0)
    fwd = CompileOrEager(model.eval())
    with torch.no_grad():
        fwd(x), fwd(x)
    err = capsys.readouterr().err
    assert err.count("notice: torch.compile unavailable") == 2  # one per wrapper, not one per call


@pytest.mark.parametrize("where, values", [
    ("train", {"compile_mode": "fast"}), ("train", {"channels_last": "yes"}),
])  # fmt: skip
def test_bad_speed_options_are_refused_in_one_line(where, values):
    with pytest.raises(CapsbenchError, match=f"{where}.(compile_mode|channels_last)") as e:
        from_dict(TrainConfig, values, where=where)
    assert "\n" not in str(e.value)


def test_speed_options_do_not_change_the_weight_cache_key():
    base = TrainConfig()
    fast = from_dict(TrainConfig, {"compile": True, "compile_mode": "max-autotune", "channels_last": True})
    assert fast.weight_key() == base.weight_key()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_step_bf16_compiled_channels_last_matches_eager_fp32(mode):
    """On a GPU: the fast step (inductor, bf16, channels_last, CUDA graphs in reduce-overhead)
    against the plain fp32 eager step, over several steps (graph replays)."""
    cuda = torch.device("cuda")
    model = capsnet().to(cuda)
    x, y = (t.to(cuda) for t in batch(32))
    ref, fast = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    ref_step = TrainStep(ref, torch.optim.Adam(ref.parameters(), lr=1e-4), StepOptions(cuda))
    options = StepOptions(cuda, torch.bfloat16, compile=True, compile_mode=mode, channels_last=True)
    fast_step = TrainStep(fast, torch.optim.Adam(fast.parameters(), lr=1e-4, fused=True), options)
    for _ in range(3):
        loss, _ = ref_step(x, y)
        loss_f, _ = fast_step(x, y)
        torch.testing.assert_close(loss_f, loss, rtol=0.03, atol=0)
    assert fast_step.compiled
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        err = ((p.grad - q.grad).norm() / q.grad.norm()).item()
        assert err <= 0.1, f"{name}: relative gradient error {err:.3f} after 3 steps"
