"""Batched forward passes for evaluation: every caller that scores a model on many images (the
Trainer's test accuracy, the parts) goes through ``forward_batches``, so eval mode, no_grad
and autocast are handled in one place."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from capsbench.core.device import autocast
from capsbench.models.base import BenchModel, ModelOutput, eval_mode, predict


def forward_batches(model: BenchModel, x: Tensor, batch_size: int | None = None, dtype: torch.dtype | None = None,
                    prepare: Callable[[Tensor], Tensor] | None = None) -> Iterator[tuple[slice, ModelOutput]]:  # fmt: skip
    """(rows, output) for consecutive batches of ``x``, in eval mode (restored afterwards), without
    gradients, under autocast ``dtype`` (None = fp32); ``prepare`` maps each raw batch first.
    ``batch_size`` None: the whole of ``x`` at once. The caller's loop body runs inside those
    contexts too; one that breaks out early leaves them when the generator is closed (at once in
    CPython, when the generator is dropped)."""
    step = batch_size or max(len(x), 1)  # None: one batch
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(x), step):
            rows = slice(i, min(i + step, len(x)))
            xb = prepare(x[rows]) if prepare is not None else x[rows]
            with autocast(xb.device, dtype):
                yield rows, model(xb)


def batch_scores(model: BenchModel, x: Tensor, batch_size: int | None = None, dtype: torch.dtype | None = None,
                 prepare: Callable[[Tensor], Tensor] | None = None) -> Tensor:  # fmt: skip
    """Class scores (N, C) in fp32 of ``model`` on ``x``, batch by batch."""
    return torch.cat([out.scores.float() for _, out in forward_batches(model, x, batch_size, dtype, prepare)])


def batch_predictions(model: BenchModel, x: Tensor, batch_size: int | None = None, dtype: torch.dtype | None = None,
                      prepare: Callable[[Tensor], Tensor] | None = None) -> Tensor:  # fmt: skip
    """Predicted classes (N,) int64 of ``model`` on ``x``, batch by batch."""
    return torch.cat([predict(out) for _, out in forward_batches(model, x, batch_size, dtype, prepare)])


def count_correct(model: BenchModel, x: Tensor, y: Tensor, batch_size: int | None = None, dtype: torch.dtype | None = None,
                  prepare: Callable[[Tensor], Tensor] | None = None) -> Tensor:  # fmt: skip
    """Correct predictions on (x, y) as a 0-dim device tensor (no host sync)."""
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for rows, out in forward_batches(model, x, batch_size, dtype, prepare):
        correct += (predict(out) == y[rows]).sum()
    return correct


def reconstruction_error(out: ModelOutput, x: Tensor) -> Tensor:
    """L2 distance (B,) between each input ``x`` (B, 1, S, S) and its reconstruction from the
    predicted class capsule (the DARCCC detector's statistic, Frosst, Sabour & Hinton 2018)."""
    if out.reconstruction is None:
        raise ValueError("this model returns no reconstruction (a CapsNet without its decoder, or a CNN)")
    return (out.reconstruction.float() - x.flatten(1).float()).pow(2).sum(dim=1).sqrt()
