"""The MultiMNIST part (Sabour et al. 2017, section 6): each of the run's models is rebuilt for the
(28 + 2 x max_shift)^2 canvas, trained on MultiMNIST batches generated on the device from the MNIST
training digits, and tested on MultiMNIST images made from the MNIST test digits. The prediction
is the two highest class scores; an image is wrong when either digit is (``two_digit_error``).

Losses: CapsNet, the margin loss with a two-hot target plus 0.0005 x the per-image squared error of
each digit's reconstruction (decoder masked to that digit's capsule, compared with that digit
alone); the CNNs, per-class binary cross-entropy on the two-hot target (sigmoid outputs). Training
runs on the one Trainer (``MultiMnistTask``: the shared step, so the run's compile and
channels_last options apply); the models are cached by capsbench.train.cache's ``get_trained``
(``MultiMnistRecipe``), as ``models/multimnist-<model>-<key>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from capsbench.core.config import opt, weight_fields
from capsbench.core.errors import CapsbenchError
from capsbench.core.seeds import derive_seed
from capsbench.data.multimnist import Combine, multimnist, two_digit_error
from capsbench.models import BenchModel, ModelOutput, build_model, model_options
from capsbench.models.capsule import CapsuleModel
from capsbench.models.losses import margin_loss
from capsbench.models.scoring import batch_scores
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.report.format import checks_footer, interval_cell, markdown_table
from capsbench.report.plots import example_grid
from capsbench.report.stats import wilson_interval
from capsbench.train.cache import TrainedModel
from capsbench.train.config import TrainConfig
from capsbench.train.schedules import Schedule
from capsbench.train.step import StepOptions
from capsbench.train.tasks import Task

# Bump when a change to this file's training code changes the weights it produces.
MULTIMNIST_CODE_VERSION = 1
TEST_SEED = 171009829  # the test images: fixed for every run and seed (the paper's arXiv id)
PAPER_ERROR = {"capsnet": 0.052, "baseline CNN": 0.081}  # section 6, after far longer training




@dataclass(frozen=True)
class MultiMNISTConfig:
    steps: int = opt(500, ge=1)  # a reduced run: the paper trains far longer (its MNIST runs take 300k steps)
    batch_size: int = opt(32, ge=1)
    lr: float = opt(1e-3, gt=0)
    lr_decay: float = opt(0.96, gt=0, le=1)  # multiplied into the lr every lr_decay_steps, continuously
    lr_decay_steps: int = opt(2000, ge=1)
    max_shift: int = opt(4, ge=0, le=16)  # each digit shifted by up to this many px (the paper: 4); canvas 28 + 2 x it
    combine: Combine = "max"  # overlay: pixel-wise max, or sum clipped to 1
    test_n: int = opt(1000, ge=1, in_key=False)  # test images, made from the MNIST test digits with a fixed seed
    log_every: int = opt(50, ge=1, in_key=False)  # steps between host reads of the loss (the only syncs while training)
    checkpoint_every: int = opt(250, ge=1, in_key=False)
    examples: int = opt(6, ge=0, in_key=False)  # test images in the example figure (0 = no figure)
    batch_size_eval: int = opt(250, ge=1, in_key=False)

    @property
    def input_size(self) -> int:
        return 28 + 2 * self.max_shift

    def weight_key(self) -> dict[str, Any]:
        """The fields that determine the trained weights (evaluation and logging cadence do not)."""
        return weight_fields(self)


# ---- losses -------------------------------------------------------------------------------


def two_hot(labels: Tensor, num_classes: int) -> Tensor:
    """(B, 2) labels of two different classes -> (B, C) float target, 1 at both classes."""
    return F.one_hot(labels, num_classes).sum(dim=1).float()


def capsnet_loss(model: CapsuleModel, x: Tensor, labels: Tensor, layers: Tensor) -> tuple[Tensor, ModelOutput]:
    """Two-hot margin loss + recon_weight x sum over both digits of the per-image SSE between the
    digit's reconstruction and that digit alone (``layers`` (B, 2, 1, S, S)); batch mean, and the outputs."""
    out = model(x, labels[:, 0])  # in training mode the decoder is masked to the first digit
    target = two_hot(labels, model.num_classes)  # (B, C)
    loss = margin_loss(out.scores.float(), target, model.m_plus, model.m_minus, model.lambda_)  # (B,)
    if not model.reconstructs:
        return loss.mean(), out
    recons = (out.reconstruction, model.decode(out.capsules, labels[:, 1]))  # 2 x (B, S*S)
    sse = sum(((r.float() - layers[:, k].flatten(1)) ** 2).sum(dim=1) for k, r in enumerate(recons))
    return (loss + model.recon_weight * sse).mean(), out


def multilabel_loss(model: BenchModel, x: Tensor, labels: Tensor, layers: Tensor) -> tuple[Tensor, ModelOutput]:
    """The MultiMNIST training loss (batch mean) and the outputs: CapsNet's above; any other model's
    scores are logits of independent sigmoids, trained with binary cross-entropy summed over classes."""
    if isinstance(model, CapsuleModel):
        return capsnet_loss(model, x, labels, layers)
    out = model(x)
    logits = out.scores.float()  # (B, C)
    bce = F.binary_cross_entropy_with_logits(logits, two_hot(labels, model.num_classes), reduction="none")
    return bce.sum(dim=1).mean(), out


# ---- training -----------------------------------------------------------------------------


def step_seed(seed: int, step: int, stream: int) -> int:
    """A seed for one step's random draws (stream 0: the batch, 1: dropout); (seed, step) only."""
    return derive_seed(seed, step) * 2 + stream


def train_batch(x_u8: Tensor, y_cpu: Tensor, cfg: MultiMNISTConfig, seed: int, step: int,
                ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The batch of ``step``: images (B, 1, S, S), labels (B, 2), per-digit layers (B, 2, 1, S, S)."""
    seed = step_seed(seed, step, 0)
    images, labels, p = multimnist(x_u8, y_cpu, cfg.batch_size, seed, cfg.max_shift, cfg.combine, layers=True)
    return images, labels, p["layers"]


class MultiMnistTask(Task):
    """MultiMNIST for the one Trainer: every step's batch and dropout draws are functions of
    (seed, step), so a resumed run reaches the same weights as an uninterrupted one without saving
    any random state; the loss is ``multilabel_loss``; no evaluation while training."""

    def __init__(self, cfg: MultiMNISTConfig, data: Any, seed: int, options: StepOptions) -> None:
        super().__init__(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, options=options,
                         schedule=Schedule("paper", cfg.lr_decay, cfg.lr_decay_steps), log_every=cfg.log_every,
                         checkpoint_every=cfg.checkpoint_every, input_size=cfg.input_size,
                         protocol=f"MultiMNIST, max_shift={cfg.max_shift}", lr_key="multimnist.lr")  # fmt: skip
        self.cfg, self.seed = cfg, seed
        self.train_x = data.train_x.to(options.device)
        self.train_y = data.train_y.cpu()  # the generator draws on the host: no device-to-host copy per step

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        x, labels, layers = train_batch(self.train_x, self.train_y, self.cfg, self.seed, step)
        torch.manual_seed(step_seed(self.seed, step, 1))  # dropout
        return x, labels, layers

    def loss(self, model: BenchModel, batch: tuple[Tensor, ...]) -> tuple[Tensor, ModelOutput]:
        return multilabel_loss(model, *batch)


@dataclass(frozen=True)
class MultiMnistRecipe:
    """``get_trained``'s MultiMNIST models, ``models/multimnist-<model>-<key>``: keyed by the
    config, the run's seed, the number of training digits, device and precision. The run's
    speed options (``speed``: train.compile, compile_mode, channels_last) apply, outside the key."""

    cfg: MultiMNISTConfig
    seed: int
    dtype: torch.dtype | None  # the run's autocast dtype
    n_train: int  # MNIST training digits the batches are drawn from
    speed: TrainConfig
    prefix: ClassVar[str] = "multimnist-"

    @classmethod
    def of(cls, cfg: MultiMNISTConfig, ctx: RunContext) -> MultiMnistRecipe:
        return cls(cfg, ctx.seed, ctx.dtype, len(ctx.data.train_x), ctx.train_cfg)

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    def key(self, device: torch.device) -> dict[str, Any]:
        return {"multimnist": self.cfg.weight_key(), "seed": self.seed, "train_digits": self.n_train,
                "device": device.type, "precision": str(self.dtype), "code": MULTIMNIST_CODE_VERSION}  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {"multimnist": self.cfg.weight_key(), "seed": self.seed}

    def label(self, name: str) -> str:
        return f"multimnist {name}"

    @property
    def batch_setting(self) -> tuple[str, int]:
        """(the suite key, the value) of the global batch size: torchrun's ranks must share it."""
        return "multimnist.batch_size", self.cfg.batch_size

    def task(self, data: Any, device: torch.device) -> MultiMnistTask:
        sp = self.speed
        return MultiMnistTask(self.cfg, data, self.seed,
                              StepOptions(device, self.dtype, sp.compile, sp.compile_mode, sp.channels_last))


# ---- evaluation ---------------------------------------------------------------------------


def canvas_options(name: str, meta: dict[str, Any], size: int) -> dict[str, Any]:
    """The run's options for ``name`` with input_size = ``size``; raises if the model cannot take it."""
    options = model_options(name, **{**(meta.get("options") or {}), "input_size": size})
    with torch.device("meta"):  # constructor checks only: no memory, no time
        build_model(name, **options)
    return options


def make_test_set(ctx: RunContext, cfg: MultiMNISTConfig) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``test_n`` MultiMNIST images from the MNIST test digits, the same for every run and seed."""
    return multimnist(ctx.data.test_x.to(ctx.device), ctx.data.test_y.cpu(), cfg.test_n, TEST_SEED,
                      cfg.max_shift, cfg.combine, layers=True)  # fmt: skip


def result_row(tm: TrainedModel, errors: int, n: int, cfg: MultiMNISTConfig, seed: int) -> dict[str, Any]:
    lo, hi = wilson_interval(errors, n)
    return {
        "model": tm.name, "seed": seed, "n": n, "error": errors / n, "correct_both": n - errors, "ci_low": lo,
        "ci_high": hi, "steps": tm.meta["steps"], "batch_size": cfg.batch_size, "combine": cfg.combine,
        "max_shift": cfg.max_shift, "train_seconds": tm.meta["train_seconds"], "from_cache": tm.cached,
    }  # fmt: skip


def sanity_checks(labels: Tensor, shift: Tensor, max_shift: int) -> list[Check]:
    same = int((labels[:, 0] == labels[:, 1]).sum())
    largest = int(shift.abs().max()) if shift.numel() else 0
    return [
        Check("multimnist: every test image has two different labels", same == 0,
              f"{same} of {len(labels)} pairs share a class"),
        Check(f"multimnist: every shift within +-{max_shift} px", largest <= max_shift,
              f"largest |shift| {largest} px over {len(labels)} images"),
    ]  # fmt: skip


def multimnist_jobs(ctx: RunContext, cfg: MultiMNISTConfig) -> list[tuple[str, MultiMnistRecipe, dict[str, Any]]]:
    """The run's models that can take the canvas, as training jobs (for an executor to train first)."""
    jobs = []
    for name, tm in ctx.models.items():
        try:
            jobs.append((name, MultiMnistRecipe.of(cfg, ctx), canvas_options(name, tm.meta, cfg.input_size)))
        except (CapsbenchError, ValueError):
            pass  # trained_models says why it is skipped
    return jobs


def trained_models(ctx: RunContext, cfg: MultiMNISTConfig) -> tuple[dict[str, TrainedModel], list[str]]:
    """Each run model trained on MultiMNIST, and notes for those that cannot take the canvas."""
    models, skipped = {}, []
    for name, tm in ctx.models.items():
        try:
            options = canvas_options(name, getattr(tm, "meta", {}) or {}, cfg.input_size)
        except (CapsbenchError, ValueError) as e:
            skipped.append(f"{name} skipped: it cannot take {cfg.input_size}x{cfg.input_size} input ({e})")
            continue
        models[name] = ctx.get_trained(name, MultiMnistRecipe.of(cfg, ctx), options)
    return models, skipped


COLUMNS = ["model", "seed", "n", "error", "correct_both", "ci_low", "ci_high", "steps", "batch_size", "combine",
           "max_shift", "train_seconds", "from_cache"]  # fmt: skip
MULTIMNIST_TABLES = {"multimnist": COLUMNS}


@part("multimnist", MultiMNISTConfig, MULTIMNIST_TABLES, needs_training=False, jobs=multimnist_jobs)
def run_multimnist(ctx: RunContext, cfg: MultiMNISTConfig) -> PartResult:
    if ctx.data is None:
        raise CapsbenchError("the multimnist part needs the MNIST training set, but the run context has none "
                             "(RunContext.data); the runner must pass the loaded MNIST")  # fmt: skip
    models, skipped = trained_models(ctx, cfg)
    x, labels, p = make_test_set(ctx, cfg)
    scores = {name: batch_scores(tm.model, x, cfg.batch_size_eval, ctx.dtype) for name, tm in models.items()}
    errors = torch.stack([two_digit_error(s, labels).sum() for s in scores.values()]).tolist() if scores else []
    df = pd.DataFrame([result_row(tm, e, len(x), cfg, ctx.seed) for tm, e in zip(models.values(), errors)],
                      columns=COLUMNS)  # fmt: skip
    checks = sanity_checks(labels.cpu(), p["shift"], cfg.max_shift)
    figures = {"multimnist_error": error_figure(df, cfg)} if len(df) else {}
    if cfg.examples and models:
        figures["multimnist_examples"] = examples_figure(models, x, labels, p["layers"], scores, cfg.examples)
    return PartResult({"multimnist": df}, figures, summary(df, cfg, skipped, checks), checks)


# ---- figures and summary ------------------------------------------------------------------


def error_figure(df: pd.DataFrame, cfg: MultiMNISTConfig) -> Figure:
    """Test error (%) per model with its 95% Wilson interval."""
    fig = Figure(figsize=(1.6 * len(df) + 3, 4))
    ax = fig.subplots()
    pct = 100 * df.error
    yerr = [pct - 100 * df.ci_low, 100 * df.ci_high - pct]
    ax.bar(df.model, pct, yerr=yerr, capsize=6, color=sns.color_palette("colorblind", len(df)))
    ax.set(ylabel="test error (%), either digit wrong", ylim=(0, max(5.0, float(100 * df.ci_high.max()) * 1.1)),
           title=f"MultiMNIST {cfg.input_size}x{cfg.input_size}, {cfg.steps} steps x {cfg.batch_size} "
           f"(n={df.n.iloc[0]}); 95% Wilson intervals")  # fmt: skip
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def ordered_top2(scores: Tensor, labels: Tensor) -> Tensor:
    """The two highest-scoring classes (k, 2), swapped where that lines them up with the labels."""
    top2 = scores.topk(2, dim=1).indices
    swap = (top2[:, 1] == labels[:, 0]) | (top2[:, 0] == labels[:, 1])
    return torch.where(swap.unsqueeze(1), top2.flip(1), top2)


@torch.no_grad()
def examples_figure(models: dict[str, TrainedModel], x: Tensor, labels: Tensor, layers: Tensor,
                    scores: dict[str, Tensor], k: int) -> Figure:  # fmt: skip
    """Rows: the test images (titled with labels and every model's top two), each digit alone,
    then for each CapsNet the reconstructions from its two predicted capsules."""
    k = min(k, len(x))
    preds = {m: ordered_top2(s[:k], labels[:k]).tolist() for m, s in scores.items()}
    truth = labels[:k].tolist()
    guesses = [" ".join(f"{m.split('-')[0]}:{tuple(p[j])}" for m, p in preds.items()) for j in range(k)]
    titles = [f"L:{tuple(t)} {g}" for t, g in zip(truth, guesses)]
    rows = [(x[:k], "input", titles)]
    rows += [(layers[:k, d], f"digit {d + 1} alone", [str(t[d]) for t in truth]) for d in range(2)]
    for name, tm in models.items():
        if isinstance(tm.model, CapsuleModel) and tm.model.reconstructs:
            v = tm.model(x[:k]).capsules
            for d in range(2):
                target = torch.tensor([p[d] for p in preds[name]], device=x.device)
                img = tm.model.decode(v, target).float().view(k, 1, x.shape[-2], x.shape[-1])
                rows.append((img, f"{name} R{d + 1}", [f"R: {c}" for c in target.tolist()]))
    return example_grid([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                        title="MultiMNIST test images. L: labels, then each model's two highest scores.\n"
                        "CapsNet rows R1, R2: decoder masked to one predicted capsule")  # fmt: skip


def protocol_note(cfg: MultiMNISTConfig) -> str:
    size = cfg.input_size
    return (
        f"Two MNIST digits of different classes, each shifted by up to {cfg.max_shift} px in each direction, "
        f"overlaid ({cfg.combine}) on a {size}x{size} canvas (Sabour et al. 2017, section 6). Each model is rebuilt "
        f"for {size}x{size} input and trained for {cfg.steps} steps of {cfg.batch_size} images generated on the fly "
        f"from the MNIST training digits (Adam, lr {cfg.lr:g}, x{cfg.lr_decay:g} every {cfg.lr_decay_steps} steps). "
        "CapsNet: two-hot margin loss + 0.0005 x the squared error of each digit's reconstruction against that "
        "digit alone; CNNs: sigmoid outputs, binary cross-entropy on the two-hot target. Test: "
        f"{cfg.test_n} images made from the MNIST test digits (fixed seed). Error: either of the two "
        "highest-scoring classes is not a label; [95% Wilson interval]. The paper reports CapsNet "
        f"{100 * PAPER_ERROR['capsnet']:.1f}% vs its baseline CNN {100 * PAPER_ERROR['baseline CNN']:.1f}% after "
        "much longer training; a reduced run exercises the protocol and is not expected to reach those numbers."
    )


def summary(df: pd.DataFrame, cfg: MultiMNISTConfig, skipped: list[str], checks: list[Check]) -> str:
    out = ["## MultiMNIST", "", protocol_note(cfg), ""]
    if len(df):
        bounds = zip(df.error, df.ci_low, df.ci_high)
        cells = [interval_cell(*b) for b in bounds]
        shown = df.assign(error=cells)[["model", "error", "n", "steps", "train_seconds", "from_cache"]]
        out += [markdown_table(shown), ""]
    out += [f"- {note}" for note in skipped]
    out += checks_footer(checks)
    return "\n".join(out) + "\n"
