"""MultiMNIST training and the multimnist part: the multi-label losses against hand computations,
the generator's per-digit layers, the part end to end on synthetic digits, the cache, and that a
killed run resumes to bit-identical weights. Tiny CapsNets keep it fast on a CPU."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from capsbench.core.config import check, from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.data.multimnist import multimnist
from capsbench.models import BenchModel, ModelOutput, build_model
from capsbench.models.losses import margin_loss
from capsbench.parts import multimnist as mm
from capsbench.parts.base import PARTS, RunContext
from capsbench.train.cache import TrainedModel, cache_key, get_trained
from capsbench.train.config import TrainConfig
from capsbench.train.step import StepOptions, TrainStep
from capsbench.train.trainer import Trainer
from tests.conftest import synthetic_digits

TINY_CAPS = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": [32, 64]}  # as a run's meta stores them
COLUMNS = ["model", "seed", "n", "error", "correct_both", "ci_low", "ci_high", "steps", "batch_size", "combine",
           "max_shift", "train_seconds", "from_cache"]  # fmt: skip


def small_cfg(**over) -> mm.MultiMNISTConfig:
    base = dict(steps=3, batch_size=4, test_n=24, log_every=2, checkpoint_every=100, examples=2, batch_size_eval=12)
    return from_dict(mm.MultiMNISTConfig, {**base, **over}, "multimnist")


def context(data, root, models: dict[str, dict], seed: int = 0) -> RunContext:
    return RunContext(
        models={name: SimpleNamespace(meta={"options": opts}) for name, opts in models.items()},
        test_x=data.test_x, test_y=data.test_y, train_cfg=TrainConfig(), device=torch.device("cpu"), dtype=None,
        seed=seed, progress=False, data=data, cache_root=str(root),
    )  # fmt: skip


def trained(name: str, options: dict, cfg: mm.MultiMNISTConfig, ctx: RunContext) -> TrainedModel:
    """The part's MultiMNIST model through the one get_trained."""
    return get_trained(name, mm.MultiMnistRecipe.of(cfg, ctx), ctx.device, options, root=ctx.cache_root,
                       progress=False, data=ctx.data)  # fmt: skip


def tiny_capsnet() -> BenchModel:
    torch.manual_seed(0)
    return build_model("capsnet", **{**TINY_CAPS, "decoder_hidden": (32, 64), "input_size": 36})


# ---- losses and the generator -----------------------------------------------------------


def test_two_hot_margin_loss_by_hand():
    lengths = torch.tensor([[0.95, 0.5, 0.05, 0.3]])
    target = mm.two_hot(torch.tensor([[0, 1]]), 4)
    assert target.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # present: max(0, 0.9 - 0.95)^2 + (0.9 - 0.5)^2; absent: 0.5 * (0 + (0.3 - 0.1)^2)
    assert margin_loss(lengths, target).item() == pytest.approx(0.16 + 0.5 * 0.04)


class ClassImage(torch.nn.Module):
    """A stand-in decoder: the unmasked capsule's class c -> an image of constant value c / 10."""

    def forward(self, flat):  # (B, 10 * 16) masked class capsules
        cls = flat.view(len(flat), 10, 16).norm(dim=-1).argmax(1)
        return (cls.float() / 10).unsqueeze(1).expand(-1, 36 * 36)


def test_capsnet_loss_reconstructs_each_digit_against_its_own_layer():
    x_u8, y = synthetic_digits(64, 2)
    x, labels, p = multimnist(x_u8, y, 4, seed=0, layers=True)
    model = tiny_capsnet().train()
    model.decoder = ClassImage()
    with torch.no_grad():
        margin = margin_loss(model(x).scores, mm.two_hot(labels, 10)).mean()
        recon = mm.capsnet_loss(model, x, labels, p["layers"])[0] - margin
        # Digit k's reconstruction (masked to label k) against digit k's own layer.
        sse = sum(((labels[:, k, None] / 10 - p["layers"][:, k].flatten(1)) ** 2).sum(1) for k in range(2))
        assert recon.item() == pytest.approx(0.0005 * sse.mean().item(), rel=1e-4)
        # By hand: digit 1 alone is all 0, digit 2 alone all 1; each reconstruction is c / 10.
        layers = torch.stack([torch.zeros_like(x), torch.ones_like(x)], 1)
        recon = mm.capsnet_loss(model, x, labels, layers)[0] - margin
    l0, l1 = labels[:, 0] / 10, labels[:, 1] / 10
    assert recon.item() == pytest.approx((0.0005 * 36 * 36 * (l0**2 + (l1 - 1) ** 2)).mean().item(), rel=1e-4)


def test_cnn_loss_is_bce_summed_over_classes():
    class Zero(BenchModel):
        num_classes = 10

        def forward(self, x, y=None):
            return ModelOutput(torch.zeros(len(x), 10))

    labels = torch.tensor([[1, 7], [2, 3]])
    loss, out = mm.multilabel_loss(Zero(), torch.zeros(2, 1, 36, 36), labels, torch.zeros(2, 2, 1, 36, 36))
    assert out.scores.shape == (2, 10)
    assert loss.item() == pytest.approx(10 * math.log(2))  # sigmoid(0) = 0.5 for every class


@pytest.mark.parametrize("combine", ["max", "sum"])
def test_generator_layers_combine_to_the_image(combine):
    x_u8, y = synthetic_digits(200, 3)
    images, labels, p = multimnist(x_u8, y, 40, seed=5, combine=combine, layers=True)
    assert p["layers"].shape == (40, 2, 1, 36, 36)
    expected = p["layers"].amax(1) if combine == "max" else p["layers"].sum(1).clamp(0, 1)
    assert torch.equal(images, expected)
    plain, plain_labels, q = multimnist(x_u8, y, 40, seed=5, combine=combine)
    assert torch.equal(plain, images) and torch.equal(plain_labels, labels) and "layers" not in q


# ---- the part ---------------------------------------------------------------------------


@pytest.mark.slow
def test_part_end_to_end_then_from_cache(fake_mnist, tmp_path):
    p = PARTS.get("multimnist")
    assert (p.config, p.run) == (mm.MultiMNISTConfig, mm.run_multimnist)
    ctx = context(fake_mnist, tmp_path, {"capsnet": TINY_CAPS, "cnn-pooled": {}})
    res = mm.run_multimnist(ctx, small_cfg())
    df = res.tables["multimnist"]
    assert list(df.columns) == COLUMNS and list(df.model) == ["capsnet", "cnn-pooled"]
    assert df.error.between(0, 1).all() and (df.n == 24).all() and (df.steps == 3).all() and not df.from_cache.any()
    assert (df.correct_both == df.n - (df.error * df.n).round()).all() and (df.ci_low <= df.error).all()
    assert set(res.figures) == {"multimnist_error", "multimnist_examples"}
    assert res.summary.startswith("## MultiMNIST") and all(c.passed for c in res.checks) and len(res.checks) == 2
    again = mm.run_multimnist(ctx, small_cfg(test_n=12, log_every=1))  # evaluation and logging: same weights
    assert again.tables["multimnist"].from_cache.all()
    assert list(again.tables["multimnist"].train_seconds) == list(df.train_seconds)


@pytest.mark.slow
def test_cached_weights_are_the_trained_ones(fake_mnist, tmp_path):
    ctx = context(fake_mnist, tmp_path, {})
    cfg = small_cfg(steps=2)
    options = mm.canvas_options("cnn-pooled", {}, cfg.input_size)
    first = trained("cnn-pooled", options, cfg, ctx)
    second = trained("cnn-pooled", options, cfg, ctx)
    assert not first.cached and second.cached
    assert [h["step"] for h in first.meta["history"]] == [2] and math.isfinite(first.meta["history"][0]["train_loss"])
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    folder = tmp_path / "models" / f"multimnist-cnn-pooled-{first.meta['key']}"
    assert (folder / "model.pt").exists() and (folder / "meta.json").exists()
    assert not (folder / "checkpoint.pt").exists()
    other_seed = trained("cnn-pooled", options, cfg, context(fake_mnist, tmp_path, {}, seed=1))
    assert not other_seed.cached


@pytest.mark.slow
@pytest.mark.parametrize("name, options", [("cnn-pooled", {}), ("capsnet", TINY_CAPS)])
def test_killed_run_resumes_to_the_same_weights(fake_mnist, tmp_path, monkeypatch, name, options):
    cfg = small_cfg(steps=4, checkpoint_every=2)
    opts = mm.canvas_options(name, {"options": options}, cfg.input_size)
    whole = trained(name, opts, cfg, context(fake_mnist, tmp_path / "a", {}))
    ctx = context(fake_mnist, tmp_path / "b", {})
    real = mm.train_batch

    def killed_at_3(x, y, c, seed, step):
        if step == 3:
            raise KeyboardInterrupt  # as if the process were killed after the checkpoint at step 2
        return real(x, y, c, seed, step)

    monkeypatch.setattr(mm, "train_batch", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        trained(name, opts, cfg, ctx)
    (ckpt,) = (tmp_path / "b" / "models").glob("*/checkpoint.pt")
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    steps_run = []

    def recorded(x, y, c, seed, step):
        steps_run.append(step)
        return real(x, y, c, seed, step)

    monkeypatch.setattr(mm, "train_batch", recorded)
    resumed = trained(name, opts, cfg, ctx)
    assert steps_run == [2, 3]  # resumed from the checkpoint, not retrained from scratch
    assert not resumed.cached and resumed.meta["steps"] == 4 and not ckpt.exists()
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_the_cache_key_names_the_task_kind_and_leaves_out_speed_options(fake_mnist, tmp_path):
    ctx = context(fake_mnist, tmp_path, {})
    cfg = small_cfg()
    opts = mm.canvas_options("cnn-pooled", {}, cfg.input_size)
    recipe = mm.MultiMnistRecipe.of(cfg, ctx)
    key = cache_key("cnn-pooled", opts, recipe, ctx.device)
    mnist = TrainConfig(augment="canvas", canvas=cfg.input_size)  # the same model on an MNIST canvas task
    assert key != cache_key("cnn-pooled", opts, mnist, ctx.device)
    fast = dataclasses.replace(recipe, speed=TrainConfig(compile=True, compile_mode="max-autotune", channels_last=True))
    assert key == cache_key("cnn-pooled", opts, fast, ctx.device)
    assert key != cache_key("cnn-pooled", opts, dataclasses.replace(recipe, seed=1), ctx.device)
    assert key != cache_key("cnn-pooled", opts, mm.MultiMnistRecipe.of(small_cfg(steps=4), ctx), ctx.device)
    assert recipe.prefix == "multimnist-" and recipe.label("x") == "multimnist x"
    task = fast.task(fake_mnist, ctx.device)
    assert task.options.compile and task.options.channels_last and task.options.compile_mode == "max-autotune"


def _train_tiny_capsnet(fake_mnist, options: StepOptions, steps: int = 3):
    cfg = small_cfg(steps=steps, log_every=1)
    torch.manual_seed(0)
    model = build_model("capsnet", **{**TINY_CAPS, "decoder_hidden": (32, 64), "input_size": cfg.input_size})
    trainer = Trainer(model, mm.MultiMnistTask(cfg, fake_mnist, seed=0, options=options), progress=False)
    return model, trainer, trainer.run()


@pytest.mark.slow
def test_compiled_channels_last_multimnist_runs_the_shared_step(fake_mnist):
    """MultiMNIST through the one Trainer's TrainStep: compiled (aot_eager: dynamo's capture and
    AOTAutograd's split, without inductor's code generation) and channels_last, it computes the eager run's
    function (fp32: the same weights up to summation order)."""
    eager, _, ref = _train_tiny_capsnet(fake_mnist, StepOptions(torch.device("cpu")))
    fast_options = StepOptions(torch.device("cpu"), compile=True, channels_last=True, backend="aot_eager")
    fast, trainer, res = _train_tiny_capsnet(fake_mnist, fast_options)
    assert isinstance(trainer.step_fn, TrainStep) and trainer.step_fn.compiled and trainer.step_fn.failure == ""
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    losses = [h["train_loss"] for h in res.history]
    assert losses == pytest.approx([h["train_loss"] for h in ref.history], rel=1e-5)
    for (k, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)


def test_multimnist_steps_log_both_digits_right(fake_mnist):
    """The shared step counts an image as correct when its two highest scores are its two labels."""
    _, _, res = _train_tiny_capsnet(fake_mnist, StepOptions(torch.device("cpu")), steps=2)
    assert [h["step"] for h in res.history] == [1, 2] and res.test_accuracy is None
    assert all(0 <= h["train_accuracy"] <= 1 and math.isfinite(h["train_loss"]) for h in res.history)


def test_a_nan_loss_is_a_one_line_error(fake_mnist, tmp_path, monkeypatch):
    real = mm.multilabel_loss
    monkeypatch.setattr(mm, "multilabel_loss", lambda *a: (lambda loss, out: (loss * float("nan"), out))(*real(*a)))
    with pytest.raises(CapsbenchError, match="diverged: loss is nan at step 2") as e:
        mm.run_multimnist(context(fake_mnist, tmp_path, {"cnn-pooled": {}}), small_cfg())
    assert "\n" not in str(e.value)


def test_missing_data_and_unbuildable_models(fake_mnist, tmp_path):
    ctx = context(fake_mnist, tmp_path, {"cnn-pooled": {}})
    ctx.data = None
    with pytest.raises(CapsbenchError, match="needs the MNIST training set"):
        mm.run_multimnist(ctx, small_cfg())
    ctx = context(fake_mnist, tmp_path, {"cnn-pooled": {"no_such_option": 1}})
    res = mm.run_multimnist(ctx, small_cfg())
    assert res.tables["multimnist"].empty and "cnn-pooled skipped" in res.summary


@pytest.mark.parametrize("key, value, message", [
    ("steps", 0, "multimnist.steps must be >= 1"), ("batch_size", -1, "multimnist.batch_size"),
    ("test_n", 0, "multimnist.test_n"), ("lr", 0.0, "lr must be > 0"), ("lr_decay", 1.5, "lr_decay must be <= 1"),
    ("max_shift", -1, "multimnist.max_shift"), ("combine", "mean", "multimnist.combine must be one of max, sum"),
    ("examples", -2, "multimnist.examples"), ("checkpoint_every", 0, "multimnist.checkpoint_every"),
])  # fmt: skip
def test_config_validation(key, value, message):
    with pytest.raises(CapsbenchError, match=message) as e:
        from_dict(mm.MultiMNISTConfig, {key: value}, "multimnist")  # validates
    assert "\n" not in str(e.value)
    if key != "combine":  # a vocabulary is checked where the value is read (from_dict), not on a built object
        with pytest.raises(CapsbenchError, match=message):
            check(mm.MultiMNISTConfig(**{key: value}), "multimnist")
    with pytest.raises(CapsbenchError, match="unknown key multimnist.epochs"):
        from_dict(mm.MultiMNISTConfig, {"epochs": 3}, "multimnist")
    check(mm.MultiMNISTConfig(), "multimnist")
