"""The training loop: data resident on the device, batches by index, no host sync in a step.

Metrics accumulate as device tensors and are read every ``log_every`` steps (the only syncs).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.data import augment
from capsbench.core.device import amp_dtype, autocast
from capsbench.core.errors import CapsbenchError
from capsbench.models import BenchModel, predict
from capsbench.models.base import eval_mode
from capsbench.train import checkpoint
from capsbench.train.config import TrainConfig
from capsbench.train.step import StepOptions, TrainStep


def train_inputs(cfg: TrainConfig, x_u8: Tensor, gen: torch.Generator) -> Tensor:
    """(B, 28, 28) uint8 -> (B, 1, S, S) float training inputs under the config's protocol."""
    x = augment.to_float(x_u8)
    if cfg.augment == "shift" and cfg.max_shift > 0:
        return augment.random_shift(x, cfg.max_shift, generator=gen)
    if cfg.augment == "canvas":
        return augment.random_canvas(x, cfg.canvas, generator=gen)
    return x


def test_inputs(cfg: TrainConfig, x_u8: Tensor) -> Tensor:
    """Unshifted test digits: 28x28, or centred on the canvas ("expanded MNIST")."""
    x = augment.to_float(x_u8)
    return augment.center_canvas(x, cfg.canvas) if cfg.augment == "canvas" else x


@torch.no_grad()
def evaluate(
    model: BenchModel, x: Tensor, y: Tensor, prepare: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 500, dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Accuracy of ``model`` (eval mode, restored afterwards) on ``x``; ``prepare`` maps raw batches."""
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            xb = prepare(xb) if prepare is not None else xb
            with autocast(xb.device, dtype):
                correct += (predict(model(xb)) == y[i : i + batch_size]).sum()
    return correct.item() / max(len(x), 1), len(x)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The example order of one epoch, a function of (seed, epoch) only, so resuming needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).to(device)


def make_optimizer(model: BenchModel, cfg: TrainConfig, device: torch.device):
    """Adam with the paper's continuous exponential decay (0.96 per 2000 steps by default)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    decay, every = cfg.lr_decay, cfg.lr_decay_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: decay ** (s / every))
    return opt, sched


@dataclass
class TrainResult:
    test_accuracy: float
    test_n: int
    steps: int
    wall_s: float
    train_images_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains one model on MNIST tensors already on ``device``; resumes from ``ckpt_path``."""

    def __init__(self, model: BenchModel, cfg: TrainConfig, data: Any, device: torch.device,
                 ckpt_path: str | Path | None = None, progress: bool = True, label: str = "") -> None:  # fmt: skip
        if model.input_size != cfg.input_size:
            raise CapsbenchError(
                f"model input_size {model.input_size} does not match the training protocol's "
                f"{cfg.input_size}x{cfg.input_size} (augment={cfg.augment}, canvas={cfg.canvas})"
            )
        self.model, self.cfg, self.device = model.to(device), cfg, device
        self.ckpt_path = None if ckpt_path is None else Path(ckpt_path)
        self.progress, self.label = progress, label
        n = min(cfg.train_subset or len(data.train_x), len(data.train_x))  # a subset larger than the data = all of it
        self.train_x, self.train_y = data.train_x[:n].to(device), data.train_y[:n].to(device)
        m = cfg.test_subset or len(data.test_x)
        self.test_x, self.test_y = data.test_x[:m].to(device), data.test_y[:m].to(device)
        self.steps_per_epoch = max(n // cfg.batch_size, 1)
        self.dtype = amp_dtype(device, cfg.amp)
        self.opt, self.sched = make_optimizer(model, cfg, device)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.step, self.history, self.train_time = 0, [], 0.0
        options = StepOptions(device, self.dtype, cfg.compile, cfg.compile_mode, cfg.channels_last)
        self.step_fn = TrainStep(self.model, self.opt, options)

    def set_optimizer(self, opt: torch.optim.Optimizer, sched: Any) -> None:
        """Train with another optimizer and lr schedule from the next step on."""
        self.opt, self.sched = opt, sched
        self.step_fn.opt = opt

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "rng": checkpoint.rng_state(self.gen),
            "step": self.step, "history": self.history, "train_time": self.train_time,
        }  # fmt: skip

    def resume(self) -> bool:
        if self.ckpt_path is None or not self.ckpt_path.exists():
            return False
        s = checkpoint.load(self.ckpt_path, map_location=self.device)
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        checkpoint.set_rng_state(s["rng"], self.gen)
        self.step, self.history, self.train_time = s["step"], s["history"], s["train_time"]
        return True

    def save(self) -> None:
        if self.ckpt_path is not None:
            checkpoint.save(self.ckpt_path, self.state())

    def train_step(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step; returns (loss, number correct) as device tensors (no sync)."""
        loss, correct = self.step_fn(train_inputs(self.cfg, self.train_x[idx], self.gen), self.train_y[idx])
        self.sched.step()
        return loss, correct

    def test_accuracy(self) -> tuple[float, int]:
        return evaluate(self.model, self.test_x, self.test_y, lambda xb: test_inputs(self.cfg, xb), dtype=self.dtype)

    def run(self) -> TrainResult:
        cfg, bs = self.cfg, self.cfg.batch_size
        resumed = self.resume()
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.label or "train", unit="step",
                   disable=not self.progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)  # fmt: skip
        if resumed:
            bar.write(f"{self.label}: resuming from step {self.step} ({self.ckpt_path})")
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        order, order_epoch, since, t0 = None, -1, 0, time.perf_counter()
        while self.step < cfg.steps:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(self.train_x), cfg.seed, epoch, self.device), epoch
            loss, c = self.train_step(order[pos * bs : (pos + 1) * bs])
            loss_sum += loss
            correct += c
            self.step, since = self.step + 1, since + 1
            last = self.step == cfg.steps
            epoch_end = pos == self.steps_per_epoch - 1 and not last
            save_due = self.step % cfg.checkpoint_every == 0 and not last
            if self.step % cfg.log_every == 0 or last or epoch_end or save_due:
                self._log(bar, loss_sum, correct, since, t0)
                loss_sum.zero_(), correct.zero_()
                since = 0
            if epoch_end:
                acc, n = self.test_accuracy()
                self.history.append({"step": self.step, "epoch": epoch + 1, "test_accuracy": acc, "test_n": n})
                bar.write(f"{self.label}: epoch {epoch + 1} test accuracy {acc:.4f} (n={n})")
            if save_due:
                self.save()
            if since == 0:
                t0 = time.perf_counter()  # evaluation and checkpoint time is not training time
        bar.close()
        acc, n = self.test_accuracy()
        self.history.append({"step": self.step, "test_accuracy": acc, "test_n": n})
        self.save()
        rate = self.step * bs / self.train_time if self.train_time > 0 else float("nan")
        return TrainResult(acc, n, self.step, self.train_time, rate, self.history)

    def _log(self, bar: tqdm, loss_sum: Tensor, correct: Tensor, since: int, t0: float) -> None:
        loss = loss_sum.item() / since  # the sync point
        if not math.isfinite(loss):
            raise CapsbenchError(
                f"{self.label or 'training'} diverged: loss is {loss} at step {self.step}; "
                "lower the learning rate (--set train.lr=...) or turn off bf16 (--set train.amp=off)"
            )
        now = time.perf_counter()
        self.train_time += now - t0
        acc = correct.item() / (since * self.cfg.batch_size)
        rate = since * self.cfg.batch_size / max(now - t0, 1e-9)
        self.history.append({"step": self.step, "train_loss": loss, "train_accuracy": acc, "images_per_s": rate})
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", img_s=f"{rate:.0f}", refresh=False)
        bar.update(self.step - bar.n)
