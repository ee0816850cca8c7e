"""torch.compile is an option with a safe fallback: compiled outputs and gradients equal eager
ones (fp32, tight), and a machine where compile fails trains eagerly after one notice."""

from __future__ import annotations

import copy

import pytest
import torch

from capsbench.models import build_model
from capsbench.train.loop import CompileOrEager

TINY_CAPS = dict(conv_channels=16, primary_types=4)
TIGHT = dict(rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_to_eager_with_one_notice(monkeypatch, capsys):
    def broken_compile(module, **_):
        def call(*a, **k):
            raise RuntimeError("no C compiler found\nlong details")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = build_model("cnn-pooled").eval()
    fwd = CompileOrEager(model)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        a, b = fwd(x), fwd(x)
        ref = model(x)
    torch.testing.assert_close(a.scores, ref.scores)
    torch.testing.assert_close(b.scores, ref.scores)
    err = capsys.readouterr().err
    assert err.count("notice: torch.compile unavailable") == 1 and "no C compiler found" in err


@pytest.mark.slow
def test_compiled_capsnet_matches_eager():
    """torch.compile (inductor, CPU) gives the eager outputs and gradients; skipped if it cannot compile."""
    torch.manual_seed(0)
    model = build_model("capsnet", **TINY_CAPS)
    compiled = copy.deepcopy(model)
    x = torch.rand(4, 1, 28, 28)
    y = torch.arange(4)
    try:
        out_c = torch.compile(compiled)(x, y)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
    out = model(x, y)
    torch.testing.assert_close(out_c.capsules, out.capsules, **TIGHT)
    g = torch.autograd.grad(model.objective(out, x, y), list(model.parameters()))
    gc = torch.autograd.grad(compiled.objective(out_c, x, y), list(compiled.parameters()))
    for a, b in zip(gc, g):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
