"""The capsules part: CapsNet.decode, the Figure 4 perturbation grid, routing rows, figures,
checks and config, on untrained models and synthetic digits (labels set from the model's own
predictions, so the correct and wrong sets are known)."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from matplotlib.figure import Figure

from capsbench.core.config import from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.models import BenchModel, build_model
from capsbench.parts.base import PARTS, RunContext
from capsbench.parts.capsules import STEPS, CapsulesConfig, offsets, perturbations, run_capsules
from capsbench.train.config import TrainConfig

TINY_CAPS = dict(conv_channels=16, primary_types=4, decoder_hidden=(32, 64))
WRONG = [1, 4, 7]  # indices whose label is set to differ from the model's prediction
RECON_COLUMNS = ["model", "kind", "n", "mean_sse", "seed"]
ROUTING_COLUMNS = ["model", "example", "condition", "eps", "label", "prediction", "coupling_label", "coupling_pred",
                   "coupling_entropy", "seed"]  # fmt: skip


def seeded(name: str, **options) -> BenchModel:
    torch.manual_seed(0)
    return build_model(name, **options).eval()


@pytest.fixture(scope="module")
def capsnet() -> BenchModel:
    return seeded("capsnet")  # the paper's 8.2M-parameter network, untrained


def context(models: dict[str, BenchModel], x_u8: torch.Tensor, wrong: list[int]) -> RunContext:
    """A CPU context whose labels equal the first model's predictions except at ``wrong``."""
    ctx = RunContext(models={k: SimpleNamespace(model=m) for k, m in models.items()}, test_x=x_u8,
                     test_y=torch.zeros(len(x_u8), dtype=torch.long), train_cfg=TrainConfig(augment="none"),
                     device=torch.device("cpu"), dtype=None, seed=0, progress=False)  # fmt: skip
    with torch.no_grad():
        y = next(iter(models.values()))(ctx.test_inputs(x_u8)).scores.argmax(1)
    y[wrong] = (y[wrong] + 1) % 10
    return replace(ctx, test_y=y)


def small_cfg(**over) -> CapsulesConfig:
    base = dict(n=12, examples=4, perturb_digits=2, routing_examples=2, batch_size=12)
    return from_dict(CapsulesConfig, {**base, **over}, "capsules")


def test_part_end_to_end(capsnet, fake_mnist):
    ctx = context({"capsnet": capsnet, "cnn-pooled": seeded("cnn-pooled")}, fake_mnist.test_x[:12], WRONG)
    p = PARTS.get("capsules")
    assert (p.config, p.run) == (CapsulesConfig, run_capsules)
    res = run_capsules(ctx, small_cfg())
    assert set(res.figures) == {f"capsules_{f}_capsnet" for f in ("reconstructions", "perturbation", "routing")}
    assert all(isinstance(f, Figure) for f in res.figures.values())
    recon = res.tables["capsules_reconstruction"]
    assert list(recon.columns) == RECON_COLUMNS and recon.set_index("kind").n.to_dict() == {"correct": 9, "wrong": 3}
    assert (recon.mean_sse > 0).all() and recon.mean_sse.map(math.isfinite).all()
    rt = res.tables["capsules_routing"]
    assert list(rt.columns) == ROUTING_COLUMNS and len(rt) == 2 * 2 and set(rt.model) == {"capsnet"}
    assert rt.set_index(["condition", "example"]).eps.to_dict() == {
        ("clean", 0): 0.0, ("clean", 1): 0.0, ("adversarial", 0): 0.1, ("adversarial", 1): 0.1}  # fmt: skip
    assert (rt.label.values == ctx.test_y[[0, 1, 0, 1]].tolist()).all()
    clean = rt[rt.condition == "clean"]
    assert (clean.prediction == clean.label).tolist() == [True, False]  # example 1 is in WRONG
    for col in ("coupling_label", "coupling_pred"):
        assert rt[col].between(0, 1).all()
    assert rt.coupling_entropy.between(0, math.log(10) + 1e-6).all()
    assert {c.name: c.passed for c in res.checks} == {
        "capsnet: zero-offset perturbation equals the reconstruction": True,
        "capsnet: coupling coefficients sum to 1 over parents": True}  # fmt: skip
    assert res.summary.startswith("## Capsules")
    assert "- cnn-pooled: skipped (no class capsules with a decoder and routing)." in res.summary
    assert "| model | kind | n | mean_sse | seed |" in res.summary and "coupling_entropy" in res.summary
    assert "No wrong predictions" not in res.summary


@pytest.mark.slow
def test_figures_show_the_expected_images_and_render(capsnet, fake_mnist):
    ctx = context({"capsnet": capsnet}, fake_mnist.test_x[:12], WRONG)
    figs = run_capsules(ctx, small_cfg()).figures
    recon_images = [ax for ax in figs["capsules_reconstructions_capsnet"].axes if ax.images]
    assert len(recon_images) == 2 * (4 + 3)  # input + reconstruction for 4 correct and all 3 wrong
    pert = figs["capsules_perturbation_capsnet"].axes
    assert len(pert) == 2  # one 16 x 11 mosaic per digit, 28 px cells with 1 px separators
    assert all(ax.images[0].get_array().shape == (16 * 29 - 1, 11 * 29 - 1) for ax in pert)
    assert [t.get_text() for t in pert[0].get_xticklabels()] == [f"{o:+.2f}" for o in offsets().tolist()]
    for fig in figs.values():
        fig.savefig(io.BytesIO(), format="png", dpi=30)


def test_offsets_are_the_eleven_paper_values():
    off = offsets()
    assert off.shape == (11,) and off[STEPS].item() == 0.0
    torch.testing.assert_close(off, torch.linspace(-0.25, 0.25, 11), rtol=0, atol=1e-7)


def test_perturbation_grid_shifts_one_dimension_of_the_winning_capsule(capsnet, fake_mnist):
    x = fake_mnist.test_x[:3].float().unsqueeze(1) / 255
    with torch.no_grad():
        out = capsnet(x)
    pred = out.scores.argmax(1)
    grid = perturbations(capsnet, out.capsules, pred)
    assert grid.shape == (3, 16, 11, 28 * 28)
    for d in range(16):  # the zero-offset column is the model's own reconstruction, for every dimension
        torch.testing.assert_close(grid[:, d, STEPS], out.reconstruction, rtol=0, atol=1e-5)
    caps = out.capsules.clone()
    caps[torch.arange(3), pred, 3] += 0.25
    with torch.no_grad():
        torch.testing.assert_close(grid[:, 3, -1], capsnet.decode(caps, pred), rtol=0, atol=1e-5)
    assert (grid[:, 3, -1] - grid[:, 3, STEPS]).abs().max() > 1e-4  # the shift changes the image


def test_decode_is_the_forward_reconstruction_path():
    model = seeded("capsnet", **TINY_CAPS)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 9, 5])
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.decode(out.capsules, out.scores.argmax(1)), out.reconstruction)
        model.train()
        out = model(x, y)  # training: masked by the label
        assert torch.equal(model.decode(out.capsules, y), out.reconstruction)
    with pytest.raises(ValueError, match="no decoder"):
        seeded("capsnet", reconstruction=False, **TINY_CAPS).decode(out.capsules, y)


@pytest.mark.parametrize("wrong", [[], list(range(6))], ids=["none-wrong", "all-wrong"])
def test_an_empty_kind_is_reported_not_an_error(fake_mnist, wrong):
    model = seeded("capsnet", **TINY_CAPS)  # 4 capsule types: the routing maps must not assume 32
    res = run_capsules(context({"tiny": model}, fake_mnist.test_x[:6], wrong), small_cfg(n=6, batch_size=4))
    recon = res.tables["capsules_reconstruction"].set_index("kind")
    assert recon.n.to_dict() == {"correct": 6 - len(wrong), "wrong": len(wrong)}
    assert math.isnan(recon.mean_sse["correct" if wrong else "wrong"])
    if wrong:
        assert "tiny: no correctly classified image among the first 6, so no perturbation figure." in res.summary
        assert set(res.figures) == {"capsules_reconstructions_tiny", "capsules_routing_tiny"}
    else:
        assert "No wrong predictions among these images for: tiny" in res.summary
        assert "capsules_perturbation_tiny" in res.figures
    assert all(c.passed for c in res.checks)
    for fig in res.figures.values():
        fig.savefig(io.BytesIO(), format="png", dpi=30)


def test_no_capsule_model_gives_a_summary_only(fake_mnist):
    res = run_capsules(context({"cnn-pooled": seeded("cnn-pooled")}, fake_mnist.test_x[:4], []), small_cfg())
    assert res.figures == {} and res.tables == {} and res.checks == []
    assert res.summary.startswith("## Capsules") and "No model has class capsules" in res.summary


BAD = [("n", 0), ("examples", 0), ("perturb_digits", -1), ("routing_examples", 0), ("batch_size", 0),
       ("routing_eps", -0.1), ("routing_eps", 1.5)]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_validate_rejects_bad_values(key, value):
    from_dict(CapsulesConfig, {}, "capsules")  # the defaults pass
    with pytest.raises(CapsbenchError, match=f"capsules.{key} must be"):
        from_dict(CapsulesConfig, {key: value}, "capsules")
