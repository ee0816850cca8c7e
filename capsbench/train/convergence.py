"""How well a model was trained: images seen, epochs, final test accuracy with its interval, the
convergence rule and the preset's accuracy floor, as one record (a row of tables/models.csv and
of the table1 part's table). Claims read these rows as preconditions (report/preconditions.py).

The convergence rule: the run trained its preset's full length, and its last test evaluation and
the latest one at least an epoch before it (on the same test images) differ by at most
``TrainConfig.converge_tol``. A run shorter than two epochs has not shown convergence.
"""

from __future__ import annotations

import json
from typing import Any

from capsbench.train.config import TrainConfig

RECORD_COLUMNS = ("model", "dataset", "options", "seed", "params", "augment", "input_size", "steps", "batch_size",
                  "precision", "images_seen", "epochs", "schedule", "test_accuracy", "test_n", "converged", "convergence", "floor",
                  "meets_floor", "train_seconds", "from_cache", "key")  # fmt: skip


def convergence(meta: dict[str, Any], cfg: TrainConfig, epoch_steps: int) -> tuple[bool, str]:
    """(whether the run meets the convergence rule, the numbers behind it); ``epoch_steps``: the
    steps of one epoch, the least distance between the two evaluations compared."""
    steps, planned = int(meta["steps"]), int(meta["train"]["steps"])
    evals = [h for h in meta.get("history", []) if "test_accuracy" in h and h.get("test_n") == meta["test_n"]]
    target = float(meta["train"].get("stop_at", 0.0))
    if target and steps < planned:
        return False, (f"stopped at the first evaluation at or above {100 * target:g}%: "
                       f"{100 * float(meta['test_accuracy']):.2f}% at step {steps} of {planned} "
                       f"({steps / epoch_steps:.2f} epochs); not trained to convergence, as in the paper")  # fmt: skip
    if steps < planned:
        return False, f"stopped at step {steps} of {planned}"
    if target and float(meta["test_accuracy"]) < target:
        ok, why = convergence({**meta, "train": {**meta["train"], "stop_at": 0.0}}, cfg, epoch_steps)
        return ok, f"target {100 * target:g}% not reached in {planned} steps; {why}"
    last = evals[-1] if evals else None
    before = [h for h in evals[:-1] if last is not None and h["step"] <= last["step"] - epoch_steps]
    if not before:
        return False, f"no two test evaluations an epoch apart ({steps} steps): convergence not shown"
    a, b = before[-1]["test_accuracy"], last["test_accuracy"]
    delta = 100 * abs(b - a)
    ok = delta <= 100 * cfg.converge_tol + 1e-9
    return ok, (f"{100 * a:.2f}% at step {before[-1]['step']}, {100 * b:.2f}% at step {last['step']}: "
                f"{delta:.2f} {'<=' if ok else '>'} {100 * cfg.converge_tol:g} points")  # fmt: skip


def training_record(name: str, meta: dict[str, Any], cfg: TrainConfig, train_images: int, seed: int,
                    cached: bool) -> dict[str, Any]:  # fmt: skip
    """One row of RECORD_COLUMNS for a trained model's metadata (``meta`` of the cache entry);
    ``cfg`` gives the rule's tolerance and the floor, ``train_images`` the training set's size."""
    train, options = meta["train"], meta.get("options", {})
    n_train = min(train.get("train_subset") or train_images, train_images)
    steps, bs = int(meta["steps"]), int(train["batch_size"])
    images = steps * bs
    acc, n = float(meta["test_accuracy"]), int(meta["test_n"])
    ok, why = convergence(meta, cfg, max(n_train // bs, 1))
    return {
        "model": name, "dataset": train.get("dataset", "mnist"), "options": json.dumps(options, sort_keys=True),
        "seed": seed, "params": meta["params"],
        "augment": train["augment"], "input_size": int(options.get("input_size", 28)), "steps": steps,
        "batch_size": bs, "precision": meta.get("precision", ""),  # "" for entries cached before it was recorded
        "images_seen": images,
        "epochs": round(images / n_train, 3), "schedule": train.get("schedule", "paper"),
        "test_accuracy": acc, "test_n": n, "converged": ok, "convergence": why,
        "floor": cfg.floor, "meets_floor": acc >= cfg.floor, "train_seconds": float(meta["train_seconds"]),
        "from_cache": cached, "key": meta["key"],
    }  # fmt: skip
