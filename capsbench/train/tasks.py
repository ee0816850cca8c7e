"""What the one Trainer trains: a ``Task`` gives each step's batch and loss, the run's lengths,
schedule and speed options, and its evaluation and stop rule. ``MnistTask`` is MNIST
classification (with the MNIST protocol's input functions and test accuracy); the MultiMNIST and
time-to-accuracy parts define theirs beside their protocols.

A task's batch for step k must be reproducible after a resume: ``MnistTask`` draws each epoch's
order from (seed, epoch) and saves its augmentation generator in the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from capsbench.core.device import amp_dtype
from capsbench.core.seeds import derive_seed
from capsbench.data import augment
from capsbench.models import BenchModel, ModelOutput, count_correct
from capsbench.train import checkpoint
from capsbench.train.config import TrainConfig
from capsbench.train.schedules import Schedule
from capsbench.train.step import StepOptions, objective


class Evaluation(NamedTuple):
    """What an evaluation during training gives the Trainer."""

    row: dict[str, Any]  # appended to the run's history
    stop: bool = False  # end the run here (tta: the target is reached, or the time budget spent)
    note: str = ""  # a line for the progress output ("" = none)


class Task:
    """A Trainer's hooks. Subclasses implement ``batch``; the other hooks default to the model's own
    objective, no random state to save, and no evaluation."""

    def __init__(self, *, steps: int, batch_size: int, lr: float, schedule: Schedule, options: StepOptions,
                 log_every: int, checkpoint_every: int, input_size: int, protocol: str = "",
                 lr_key: str = "train.lr", amp_key: str = "train.amp") -> None:  # fmt: skip
        self.steps, self.batch_size = steps, batch_size  # optimizer steps; examples per step
        self.lr, self.schedule = lr, schedule  # peak learning rate (Adam) and its multiplier per step
        self.options = options  # device, autocast dtype, compile, channels_last
        self.log_every = log_every  # steps between host reads of the loss (the only syncs)
        self.checkpoint_every = checkpoint_every
        self.input_size, self.protocol = input_size, protocol  # the model input the batches have, and why
        self.lr_key, self.amp_key = lr_key, amp_key  # the --set keys a divergence message names

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def dtype(self) -> torch.dtype | None:
        return self.options.dtype

    def batch(self, step: int) -> tuple[Tensor, ...]:
        """The inputs of the optimizer step with 0-based index ``step``: (x, y, extra...) on the device."""
        raise NotImplementedError

    def loss(self, model: BenchModel, batch: tuple[Tensor, ...]) -> tuple[Tensor, ModelOutput]:
        """(scalar loss, outputs) of ``model`` on ``batch``: by default the model's own objective."""
        return objective(model, batch)

    def rng_state(self) -> dict[str, Any]:
        """Random state a checkpoint must hold for the batches after it to be the same."""
        return {}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restore what ``rng_state`` returned."""

    def start(self) -> None:
        """The loop is about to take its first step (tta starts its clock here)."""

    def eval_due(self, step: int) -> bool:
        """Whether to evaluate after ``step`` steps (a due evaluation also reads the loss)."""
        return False

    def evaluate(self, model: BenchModel, step: int, log: dict[str, Any]) -> Evaluation:
        """An evaluation after ``step`` steps; ``log`` is the loss row the Trainer just read."""
        raise NotImplementedError

    def final(self, model: BenchModel, step: int) -> dict[str, Any] | None:
        """A last evaluation after the loop (None: none)."""
        return None


# ---- MNIST classification ------------------------------------------------------------------


def train_inputs(cfg: TrainConfig, x_u8: Tensor, gen: torch.Generator) -> Tensor:
    """(B, C, H, W) uint8 images (or MNIST's (B, 28, 28)) -> (B, C, S, S) float training inputs under the
    config's protocol."""
    x = augment.to_float(x_u8)
    if cfg.augment == "shift" and cfg.max_shift > 0:
        return augment.random_shift(x, cfg.max_shift, generator=gen)
    if cfg.augment == "canvas":
        return augment.random_canvas(x, cfg.canvas, generator=gen)
    return x


def test_inputs(cfg: TrainConfig, x_u8: Tensor) -> Tensor:
    """Unshifted test images (B, C, S, S): as they are, or centred on the canvas ("expanded MNIST")."""
    x = augment.to_float(x_u8)
    return augment.center_canvas(x, cfg.canvas) if cfg.augment == "canvas" else x


def evaluate(
    model: BenchModel, x: Tensor, y: Tensor, prepare: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 500, dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Accuracy of ``model`` (eval mode, restored afterwards) on ``x``; ``prepare`` maps raw batches."""
    correct = count_correct(model, x, y, batch_size, dtype, prepare)
    return correct.item() / max(len(x), 1), len(x)


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The example order (n,) of one epoch, a function of (seed, epoch) only, so resuming needs no
    state: a host randperm, moved to the device."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=g).to(device)


class MnistTask(Task):
    """Classification of the config's dataset (MNIST unless train.dataset is set): the images on the
    device, batches by index in each epoch's order, augmentation drawn from a device generator (saved
    in checkpoints with the global RNG, for dropout), the config's lr schedule, test accuracy at the
    ends of epochs (those the convergence rule can read, see eval_due) and after the run."""

    def __init__(self, cfg: TrainConfig, data: Any, device: torch.device) -> None:
        train_dtype = amp_dtype(device, cfg.amp, training=True)
        options = StepOptions(device, train_dtype, cfg.compile, cfg.compile_mode, cfg.channels_last)
        super().__init__(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, options=options,
                         schedule=cfg.lr_schedule(), log_every=cfg.log_every,
                         checkpoint_every=cfg.checkpoint_every, input_size=cfg.input_size,
                         protocol=f"{cfg.dataset}, augment={cfg.augment}, canvas={cfg.canvas}")  # fmt: skip
        self.cfg = cfg
        # Test accuracy in the precision the parts evaluate in (fp32 on a CPU under auto, where
        # training may run under bf16 autocast), so models.csv reports the model the tables test.
        self.eval_dtype = amp_dtype(device, cfg.amp)
        n = min(cfg.train_subset or len(data.train_x), len(data.train_x))  # a subset larger than the data = all of it
        self.train_x, self.train_y = data.train_x[:n].to(device), data.train_y[:n].to(device)
        m = cfg.test_subset or len(data.test_x)
        self.test_x, self.test_y = data.test_x[:m].to(device), data.test_y[:m].to(device)
        self.steps_per_epoch = max(n // cfg.batch_size, 1)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.order, self.order_epoch = torch.empty(0, dtype=torch.long), -1
        self.eval_steps = cfg.eval_every or self.steps_per_epoch  # steps between test evaluations
        self.last: dict[str, Any] | None = None  # the latest evaluation (final() reuses it at the same step)

    def epoch_order(self, epoch: int) -> Tensor:
        """The order (n,) of ``epoch`` on the device."""
        return epoch_order(len(self.train_x), self.cfg.seed, epoch, self.device)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self.order_epoch:
            self.order, self.order_epoch = self.epoch_order(epoch), epoch
        bs = self.batch_size
        return self.examples(self.order[pos * bs : (pos + 1) * bs])

    def examples(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Training inputs (B, C, S, S) and labels (B,) of the images ``idx`` (B,)."""
        return train_inputs(self.cfg, self.train_x[idx], self.gen), self.train_y[idx]

    def rng_state(self) -> dict[str, Any]:
        return checkpoint.rng_state(self.gen)

    def set_rng_state(self, state: dict[str, Any]) -> None:
        checkpoint.set_rng_state(state, self.gen)

    def test_accuracy(self, model: BenchModel, batch_size: int = 500) -> tuple[float, int]:
        return evaluate(model, self.test_x, self.test_y, lambda xb: test_inputs(self.cfg, xb), batch_size, self.eval_dtype)

    def eval_due(self, step: int) -> bool:
        """At every ``eval_every`` steps (the stop rule reads each), else at each epoch's end that is
        at least an epoch before the last step: the convergence rule compares the final evaluation
        (final()) with the latest an epoch or more before it, so a later one would be unused work
        (at the quick preset's 500 steps, a 10,000-image evaluation at step 468)."""
        if step % self.eval_steps or step >= self.steps:
            return False
        return bool(self.cfg.eval_every) or self.steps - step >= self.steps_per_epoch

    def evaluate(self, model: BenchModel, step: int, log: dict[str, Any]) -> Evaluation:
        acc, n = self.test_accuracy(model)
        epoch = step / self.steps_per_epoch
        self.last = {"step": step, "epoch": round(epoch, 3), "test_accuracy": acc, "test_n": n}
        stop = bool(self.cfg.stop_at) and acc >= self.cfg.stop_at
        why = f": at or above the target {100 * self.cfg.stop_at:g}%, stopping" if stop else ""
        return Evaluation(self.last, stop, note=f"epoch {epoch:.2f} test accuracy {acc:.4f} (n={n}){why}")

    def final(self, model: BenchModel, step: int) -> dict[str, Any]:
        if self.last is not None and self.last["step"] == step:  # stopped at an evaluation: its numbers
            return {"step": step, "test_accuracy": self.last["test_accuracy"], "test_n": self.last["test_n"]}
        acc, n = self.test_accuracy(model)
        return {"step": step, "test_accuracy": acc, "test_n": n}
