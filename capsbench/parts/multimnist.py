"""The MultiMNIST part (Sabour et al. 2017, section 6): each of the run's models is rebuilt for the
(28 + 2 x max_shift)^2 canvas, trained on MultiMNIST batches generated on the device from the MNIST
training digits, and tested on MultiMNIST images made from the MNIST test digits. The prediction
is the two highest class scores; an image is wrong when either digit is (``two_digit_error``).

Losses: CapsNet, the margin loss with a two-hot target plus 0.0005 x the per-image squared error of
each digit's reconstruction (decoder masked to that digit's capsule, compared with that digit
alone); the CNNs, per-class binary cross-entropy on the two-hot target (sigmoid outputs). Trained
models are cached beside capsbench.train.cache's, as ``models/multimnist-<model>-<key>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.core import atomic
from capsbench.data.multimnist import COMBINES, multimnist, two_digit_error
from capsbench.core.device import autocast
from capsbench.core.env import environment
from capsbench.core.errors import CapsbenchError
from capsbench.core.lock import file_lock
from capsbench.models import BenchModel, CapsNet, build_model, model_options
from capsbench.report.plots import example_grid
from capsbench.report.stats import wilson_interval
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.report.format import markdown_table
from capsbench.train import checkpoint
from capsbench.train.cache import TrainedModel, model_folder
from capsbench.train.config import TrainConfig
from capsbench.train.trainer import make_optimizer

# Bump when a change to this file's training code changes the weights it produces.
MULTIMNIST_CODE_VERSION = 1
TEST_SEED = 171009829  # the test images: fixed for every run and seed (the paper's arXiv id)
PAPER_ERROR = {"capsnet": 0.052, "baseline CNN": 0.081}  # section 6, after far longer training


POSITIVE = ("steps", "batch_size", "lr_decay_steps", "test_n", "log_every", "checkpoint_every", "batch_size_eval")


@dataclass(frozen=True)
class MultiMNISTConfig:
    steps: int = 500  # a reduced run: the paper trains far longer (its MNIST runs take 300k steps)
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.96  # multiplied into the lr every lr_decay_steps, continuously
    lr_decay_steps: int = 2000
    max_shift: int = 4  # each digit shifted by up to this many px; canvas 28 + 2 x max_shift
    combine: str = "max"  # overlay: pixel-wise max, or sum clipped to 1
    test_n: int = 1000  # test images, made from the MNIST test digits with a fixed seed
    log_every: int = 50  # steps between host reads of the loss (the only syncs while training)
    checkpoint_every: int = 250
    examples: int = 6  # test images in the example figure (0 = no figure)
    batch_size_eval: int = 250

    def validate(self, where: str) -> None:
        for key in POSITIVE:
            if getattr(self, key) < 1:
                raise CapsbenchError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and 0 < self.lr_decay <= 1):
            raise CapsbenchError(f"{where}: lr must be > 0 and lr_decay in (0, 1], got {self.lr}, {self.lr_decay}")
        if not 0 <= self.max_shift <= 16:
            raise CapsbenchError(f"{where}.max_shift must be in 0..16 px (the paper: 4), got {self.max_shift}")
        if self.combine not in COMBINES:
            raise CapsbenchError(f"{where}.combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        if self.examples < 0:
            raise CapsbenchError(f"{where}.examples must be >= 0, got {self.examples}")

    @property
    def input_size(self) -> int:
        return 28 + 2 * self.max_shift

    def weight_key(self) -> dict[str, Any]:
        """The fields that determine the trained weights (evaluation and logging cadence do not)."""
        d = asdict(self)
        for k in ("test_n", "log_every", "checkpoint_every", "examples", "batch_size_eval"):
            d.pop(k)
        return d


# ---- losses -------------------------------------------------------------------------------


def two_hot(labels: Tensor, num_classes: int) -> Tensor:
    """(B, 2) labels of two different classes -> (B, C) float target, 1 at both classes."""
    return F.one_hot(labels, num_classes).sum(dim=1).float()


def multi_margin_loss(lengths: Tensor, target: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                      lambda_: float = 0.5) -> Tensor:  # fmt: skip
    """Per-image margin loss (B,) for a multi-hot target T (B, C): paper eq. 4 with T_k = 1 for
    every digit present, summed over classes."""
    present = target * F.relu(m_plus - lengths) ** 2
    absent = lambda_ * (1 - target) * F.relu(lengths - m_minus) ** 2
    return (present + absent).sum(dim=1)


def capsnet_loss(model: CapsNet, x: Tensor, labels: Tensor, layers: Tensor) -> Tensor:
    """Two-hot margin loss + recon_weight x sum over both digits of the per-image SSE between the
    digit's reconstruction and that digit alone (``layers`` (B, 2, 1, S, S)); batch mean."""
    cfg = model.cfg
    out = model(x, labels[:, 0])  # in training mode the decoder is masked to the first digit
    target = two_hot(labels, model.num_classes)
    loss = multi_margin_loss(out.scores.float(), target, cfg.m_plus, cfg.m_minus, cfg.lambda_)
    if model.decoder is None:
        return loss.mean()
    recons = (out.reconstruction, model.decode(out.capsules, labels[:, 1]))
    sse = sum(((r.float() - layers[:, k].flatten(1)) ** 2).sum(dim=1) for k, r in enumerate(recons))
    return (loss + cfg.recon_weight * sse).mean()


def multilabel_loss(model: BenchModel, x: Tensor, labels: Tensor, layers: Tensor) -> Tensor:
    """The MultiMNIST training loss (batch mean): CapsNet's above; any other model's scores are
    logits of independent sigmoids, trained with binary cross-entropy summed over classes."""
    if isinstance(model, CapsNet):
        return capsnet_loss(model, x, labels, layers)
    logits = model(x).scores.float()
    bce = F.binary_cross_entropy_with_logits(logits, two_hot(labels, model.num_classes), reduction="none")
    return bce.sum(dim=1).mean()


# ---- training -----------------------------------------------------------------------------


def step_seed(seed: int, step: int, stream: int) -> int:
    """A seed for one step's random draws (stream 0: the batch, 1: dropout); (seed, step) only."""
    return (seed * 1_000_003 + step) * 2 + stream


def train_batch(x_u8: Tensor, y_cpu: Tensor, cfg: MultiMNISTConfig, seed: int, step: int,
                ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The batch of ``step``: images (B, 1, S, S), labels (B, 2), per-digit layers (B, 2, 1, S, S)."""
    seed = step_seed(seed, step, 0)
    images, labels, p = multimnist(x_u8, y_cpu, cfg.batch_size, seed, cfg.max_shift, cfg.combine, layers=True)
    return images, labels, p["layers"]


class MultiTrainer:
    """Trains one model on MultiMNIST batches generated on ``device``; resumes from ``ckpt_path``.

    Every step's batch and dropout draws are functions of (seed, step), so a resumed run reaches
    the same weights as an uninterrupted one without saving any random state."""

    def __init__(self, model: BenchModel, cfg: MultiMNISTConfig, ctx: RunContext, ckpt_path: Path, label: str) -> None:
        self.model, self.cfg, self.device, self.dtype = model.to(ctx.device), cfg, ctx.device, ctx.dtype
        self.seed, self.ckpt_path, self.label, self.progress = ctx.seed, ckpt_path, label, ctx.progress
        self.train_x = ctx.data.train_x.to(ctx.device)
        self.train_y = ctx.data.train_y.cpu()  # the generator draws on the host: no device-to-host copy per step
        schedule = TrainConfig(lr=cfg.lr, lr_decay=cfg.lr_decay, lr_decay_steps=cfg.lr_decay_steps)
        self.opt, self.sched = make_optimizer(model, schedule, ctx.device)
        self.step, self.train_time, self.history = 0, 0.0, []

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "step": self.step, "train_time": self.train_time, "history": self.history,
        }  # fmt: skip

    def resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        s = checkpoint.load(self.ckpt_path, map_location=self.device)
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.step, self.train_time, self.history = s["step"], s["train_time"], s["history"]
        return True

    def train_step(self) -> Tensor:
        """One optimizer step; returns the loss as a device tensor (no sync)."""
        x, labels, layers = train_batch(self.train_x, self.train_y, self.cfg, self.seed, self.step)
        torch.manual_seed(step_seed(self.seed, self.step, 1))  # dropout
        with autocast(self.device, self.dtype):
            loss = multilabel_loss(self.model, x, labels, layers)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()

    def run(self) -> None:
        cfg = self.cfg
        resumed = self.resume()
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.label, unit="step", disable=not self.progress,
                   dynamic_ncols=True, mininterval=1.0, file=sys.stderr)  # fmt: skip
        if resumed:
            bar.write(f"{self.label}: resuming from step {self.step} ({self.ckpt_path})")
        loss_sum, since, t0 = torch.zeros((), device=self.device), 0, time.perf_counter()
        while self.step < cfg.steps:
            loss_sum += self.train_step()
            self.step, since = self.step + 1, since + 1
            save_due = self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or save_due:
                self._log(bar, loss_sum.item() / since, t0)  # the sync point
                loss_sum.zero_()
                since = 0
                if save_due:
                    checkpoint.save(self.ckpt_path, self.state())
                t0 = time.perf_counter()  # checkpoint time is not training time
        bar.close()

    def _log(self, bar: tqdm, loss: float, t0: float) -> None:
        if not math.isfinite(loss):
            raise CapsbenchError(f"{self.label} diverged: loss is {loss} at step {self.step}; lower the learning rate "
                                 "(--set multimnist.lr=...) or turn off bf16 (--set train.amp=off)")  # fmt: skip
        self.train_time += time.perf_counter() - t0
        self.history.append({"step": self.step, "train_loss": loss})
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.update(self.step - bar.n)


def cache_key(name: str, options: dict[str, Any], cfg: MultiMNISTConfig, ctx: RunContext, n_train: int) -> str:
    """A short hash of everything that determines the weights."""
    payload = {
        "model": name, "options": options, "multimnist": cfg.weight_key(), "seed": ctx.seed, "train_digits": n_train,
        "device": ctx.device.type, "precision": str(ctx.dtype), "code": MULTIMNIST_CODE_VERSION,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def get_multimnist_model(name: str, options: dict[str, Any], cfg: MultiMNISTConfig, ctx: RunContext) -> TrainedModel:
    """The model trained on MultiMNIST, from the cache, or trained (or resumed) and cached first."""
    key = cache_key(name, options, cfg, ctx, len(ctx.data.train_x))
    folder = model_folder(f"multimnist-{name}", key, ctx.cache_root)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "lock"):
        final = folder / "model.pt"
        if final.exists():
            state = checkpoint.load(final, map_location=ctx.device)
            model = build_model(name, **options)
            model.load_state_dict(state["model"])
            return TrainedModel(name, model.to(ctx.device).eval(), state["meta"], cached=True)
        torch.manual_seed(ctx.seed)  # initial weights are a function of the seed
        model = build_model(name, **options)
        trainer = MultiTrainer(model, cfg, ctx, folder / "checkpoint.pt", label=f"multimnist {name}")
        trainer.run()
        meta = {
            "model": name, "options": options, "multimnist": cfg.weight_key(), "seed": ctx.seed, "key": key,
            "steps": trainer.step, "train_seconds": trainer.train_time, "params": model.num_params(),
            "history": trainer.history, "created_unix": time.time(), "env": environment(ctx.device),
        }  # fmt: skip
        meta = json.loads(json.dumps(meta, default=str))  # plain types only: loadable with weights_only
        checkpoint.save(final, {"model": model.state_dict(), "meta": meta})
        atomic.write_text(folder / "meta.json", json.dumps(meta, indent=2))
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        return TrainedModel(name, model.eval(), meta, cached=False)


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


@torch.no_grad()
def all_scores(model: BenchModel, x: Tensor, ctx: RunContext, batch_size: int) -> Tensor:
    """Class scores (n, C) of ``model`` in eval mode, in batches, under the run's autocast."""
    model.eval()
    with autocast(ctx.device, ctx.dtype):
        return torch.cat([model(x[i : i + batch_size]).scores.float() for i in range(0, len(x), batch_size)])


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


def trained_models(ctx: RunContext, cfg: MultiMNISTConfig) -> tuple[dict[str, TrainedModel], list[str]]:
    """Each run model trained on MultiMNIST, and notes for those that cannot take the canvas."""
    models, skipped = {}, []
    for name, tm in ctx.models.items():
        try:
            options = canvas_options(name, getattr(tm, "meta", {}) or {}, cfg.input_size)
        except (CapsbenchError, ValueError) as e:
            skipped.append(f"{name} skipped: it cannot take {cfg.input_size}x{cfg.input_size} input ({e})")
            continue
        models[name] = get_multimnist_model(name, options, cfg, ctx)
    return models, skipped


COLUMNS = ["model", "seed", "n", "error", "correct_both", "ci_low", "ci_high", "steps", "batch_size", "combine",
           "max_shift", "train_seconds", "from_cache"]  # fmt: skip
MULTIMNIST_TABLES = {"multimnist": COLUMNS}


@part("multimnist", MultiMNISTConfig, MULTIMNIST_TABLES, needs_training=False)
def run_multimnist(ctx: RunContext, cfg: MultiMNISTConfig) -> PartResult:
    if ctx.data is None:
        raise CapsbenchError("the multimnist part needs the MNIST training set, but the run context has none "
                             "(RunContext.data); the runner must pass the loaded MNIST")  # fmt: skip
    models, skipped = trained_models(ctx, cfg)
    x, labels, p = make_test_set(ctx, cfg)
    scores = {name: all_scores(tm.model, x, ctx, cfg.batch_size_eval) for name, tm in models.items()}
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
        if isinstance(tm.model, CapsNet) and tm.model.decoder is not None:
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
        cells = [f"{100 * e:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" for e, lo, hi in bounds]
        shown = df.assign(error=cells)[["model", "error", "n", "steps", "train_seconds", "from_cache"]]
        out += [markdown_table(shown), ""]
    out += [f"- {note}" for note in skipped]
    failed = [c for c in checks if not c.passed]
    out += [f"**Checks**: {len(checks) - len(failed)} of {len(checks)} passed."]
    out += [f"- FAIL {c.name}: {c.detail}" for c in failed]
    return "\n".join(out) + "\n"
