"""The one training loop, for every task (MNIST classification, MultiMNIST, time to accuracy):
batches from the task, the shared ``TrainStep`` (compile, channels_last, bf16), one lr schedule
from the registry, no host sync in a step, checkpoints that resume to the same weights. Under torchrun the step runs in DDP on each rank's
share of every global batch (train/distributed.py); rank 0 alone writes checkpoints.

Metrics accumulate as device tensors and are read every ``log_every`` steps, at the task's
evaluations and at checkpoints (the only syncs); each read checks the loss for divergence.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.core.errors import CapsbenchError
from capsbench.core.seeds import derive_seed
from capsbench.models import BenchModel
from capsbench.train import checkpoint, distributed
from capsbench.train.divergence import check_loss
from capsbench.train.schedules import make_optimizer
from capsbench.train.step import TrainStep
from capsbench.train.tasks import Task


@dataclass
class TrainResult:
    steps: int
    wall_s: float  # training time: evaluations and checkpoints not included
    train_images_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    test_accuracy: float | None = None  # the task's final evaluation (None: it has none)
    test_n: int | None = None
    resumed_from: list[int] = field(default_factory=list)  # the steps this run resumed from (after a kill)
    world_size: int = 1  # processes that trained it (torchrun)

    def fields(self) -> dict[str, Any]:
        """The numbers a cached model's metadata records."""
        test = {} if self.test_accuracy is None else {"test_accuracy": self.test_accuracy, "test_n": self.test_n}
        return {**test, "steps": self.steps, "train_seconds": self.wall_s, "train_images_per_s": self.train_images_per_s,
                "resumed_from": self.resumed_from, "world_size": self.world_size}  # fmt: skip


class Trainer:
    """Trains ``model`` on ``task`` (its data already on the task's device); resumes from ``ckpt_path``."""

    def __init__(self, model: BenchModel, task: Task, ckpt_path: str | Path | None = None, progress: bool = True,
                 label: str = "") -> None:  # fmt: skip
        if model.input_size != task.input_size:
            raise CapsbenchError(
                f"model input_size {model.input_size} does not match the training protocol's "
                f"{task.input_size}x{task.input_size} ({task.protocol})"
            )
        self.model, self.task, self.device = model.to(task.device), task, task.device
        self.ckpt_path = None if ckpt_path is None else Path(ckpt_path)
        self.world = distributed.current()
        distributed.check_batch(self.world, task.batch_size)
        self.progress, self.label = progress and self.world.main, label
        self.opt, self.sched = make_optimizer(model, task.lr, task.schedule, task.device)
        self.step, self.history, self.train_time, self.resumed_from = 0, [], 0.0, []
        self.step_fn = TrainStep(distributed.wrap(self.world, self.model), self.opt, task.options, task.loss)
        self.rank_seed = torch.initial_seed()  # the seed of the initial weights (get_trained seeds it)

    def restart(self) -> None:
        """Train again from step 0 with a fresh optimizer and schedule; the caller resets the
        weights and the task's random state (tta's repeats reuse the compiled step)."""
        self.opt, self.sched = make_optimizer(self.model, self.task.lr, self.task.schedule, self.device)
        self.step_fn.opt = self.opt
        self.step, self.history, self.train_time, self.resumed_from = 0, [], 0.0, []

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "rng": self.task.rng_state(),
            "step": self.step, "history": self.history, "train_time": self.train_time,
            "resumed_from": self.resumed_from,
        }  # fmt: skip

    def resume(self) -> bool:
        """Continue from the checkpoint, if there is one; under torchrun, rank 0's (sent to every
        rank, so nodes need not share storage)."""
        found = self.ckpt_path is not None and self.ckpt_path.exists()
        s = checkpoint.load(self.ckpt_path, map_location="cpu") if found and self.world.main else None
        s = distributed.from_main(self.world, s)
        if s is None:
            return False
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        if "rng" in s:  # MultiMNIST checkpoints of older code have none (its batches need none)
            self.task.set_rng_state(s["rng"])
        self.step, self.history, self.train_time = s["step"], s["history"], s["train_time"]
        self.resumed_from = [*s.get("resumed_from", []), self.step]
        return True

    def save(self) -> None:
        if self.ckpt_path is not None and self.world.main:
            checkpoint.save(self.ckpt_path, self.state())

    def train_step(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """One optimizer step on ``batch`` (this rank's share of it); returns (loss, number correct)
        as device tensors (no sync)."""
        if self.world.active:  # each rank draws its dropout masks from its own stream per step (resumable)
            torch.manual_seed(derive_seed(derive_seed(self.rank_seed, self.step), self.world.rank))
        loss, correct = self.step_fn(*distributed.shard(self.world, batch))
        self.sched.step()
        return loss, correct

    def run(self) -> TrainResult:
        task = self.task
        resumed = self.resume()
        self.model.train()
        bar = tqdm(total=task.steps, initial=self.step, desc=self.label or "train", unit="step",
                   disable=not self.progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)  # fmt: skip
        if resumed and self.world.main:
            bar.write(f"{self.label}: resuming from step {self.step} ({self.ckpt_path})")
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        task.start()
        since, t0 = 0, time.perf_counter()
        while self.step < task.steps:
            loss, c = self.train_step(task.batch(self.step))
            loss_sum += loss
            correct += c
            self.step, since = self.step + 1, since + 1
            last = self.step == task.steps
            eval_due = task.eval_due(self.step)
            save_due = self.step % task.checkpoint_every == 0 and not last
            if self.step % task.log_every == 0 or last or eval_due or save_due:
                log = self._log(bar, loss_sum, correct, since, t0)
                loss_sum.zero_(), correct.zero_()
                since = 0
            if eval_due:
                ev = task.evaluate(self.model, self.step, log)
                self.history.append(ev.row)
                if ev.note and self.world.main:
                    bar.write(f"{self.label}: {ev.note}")
                if ev.stop:
                    break
            if save_due:
                self.save()
            if since == 0:
                t0 = time.perf_counter()  # evaluation and checkpoint time is not training time
        bar.close()
        final = task.final(self.model, self.step)
        if final is not None:
            self.history.append(final)
        self.save()
        rate = self.step * task.batch_size / self.train_time if self.train_time > 0 else float("nan")
        test = {} if final is None else {"test_accuracy": final["test_accuracy"], "test_n": final["test_n"]}
        return TrainResult(self.step, self.train_time, rate, self.history, **test, resumed_from=self.resumed_from,
                           world_size=self.world.size)  # fmt: skip

    def _log(self, bar: tqdm, loss_sum: Tensor, correct: Tensor, since: int, t0: float) -> dict[str, Any]:
        """Read the accumulated metrics (the sync point; summed over the ranks), check the loss, and
        add a history row."""
        distributed.all_sum(self.world, loss_sum, correct)
        loss = loss_sum.item() / (since * self.world.size)
        check_loss(loss, self.label, self.step, self.task.lr_key, self.task.amp_key)
        now = time.perf_counter()
        self.train_time += now - t0
        bs = self.task.batch_size
        acc = correct.item() / (since * bs)
        rate = since * bs / max(now - t0, 1e-9)
        row = {"step": self.step, "train_loss": loss, "train_accuracy": acc, "images_per_s": rate}
        self.history.append(row)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", img_s=f"{rate:.0f}", refresh=False)
        bar.update(self.step - bar.n)
        return row
