"""Cache of trained models, keyed by a hash of everything that determines the weights.

``<cache>/models/<name>-<key>/`` holds ``model.pt`` (state dict + metadata), ``meta.json``
(human-readable) and, while training, ``checkpoint.pt`` (so a killed run resumes). A file
lock makes two processes asking for the same model wait for one training run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capsbench.core import atomic
from capsbench.data import cache_dir, load_mnist
from capsbench.core.device import amp_dtype
from capsbench.core.env import environment
from capsbench.core.lock import file_lock
from capsbench.models import BenchModel, build_model, model_options
from capsbench.train import checkpoint
from capsbench.train.config import TrainConfig
from capsbench.train.trainer import Trainer

# Bump when a change to the training code changes the weights it produces.
TRAIN_CODE_VERSION = 1


def cache_key(name: str, options: dict[str, Any], cfg: TrainConfig, device: torch.device) -> str:
    """A short hash of model, options, training config, data protocol, seed, device, precision."""
    payload = {
        "model": name, "options": options, "train": cfg.weight_key(), "device": device.type,
        "precision": str(amp_dtype(device, cfg.amp)), "code": TRAIN_CODE_VERSION,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainedModel:
    name: str
    model: BenchModel  # in eval mode, on the requested device
    meta: dict[str, Any]
    cached: bool  # True when the weights came from the cache without training

    @property
    def test_accuracy(self) -> float:
        return float(self.meta["test_accuracy"])


def model_folder(name: str, key: str, root: str | Path | None = None) -> Path:
    return cache_dir(root) / "models" / f"{name}-{key}"


def get_trained(
    name: str, cfg: TrainConfig, device: torch.device, options: dict[str, Any] | None = None,
    root: str | Path | None = None, progress: bool = True, data: Any = None,
) -> TrainedModel:
    """Return the trained model from the cache, training it (or resuming training) first if needed."""
    options = model_options(name, **{"input_size": cfg.input_size, **(options or {})})
    key = cache_key(name, options, cfg, device)
    folder = model_folder(name, key, root)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "lock"):
        final = folder / "model.pt"
        if final.exists():
            model = build_model(name, **options)
            state = checkpoint.load(final, map_location=device)
            model.load_state_dict(state["model"])
            return TrainedModel(name, model.to(device).eval(), state["meta"], cached=True)
        torch.manual_seed(cfg.seed)  # initial weights are a function of the seed
        model = build_model(name, **options)
        data = data if data is not None else load_mnist(root)
        trainer = Trainer(model, cfg, data, device, folder / "checkpoint.pt", progress, label=name)
        started = time.time()
        result = trainer.run()
        meta = {
            "model": name, "options": options, "train": cfg.weight_key(), "preset": cfg.description,
            "key": key, "test_accuracy": result.test_accuracy, "test_n": result.test_n,
            "steps": result.steps, "train_seconds": result.wall_s,
            "train_images_per_s": result.train_images_per_s, "params": model.num_params(),
            "history": result.history, "created_unix": started, "env": environment(device),
        }  # fmt: skip
        meta = json.loads(json.dumps(meta, default=str))  # plain types only: loadable with weights_only
        checkpoint.save(final, {"model": model.state_dict(), "meta": meta})
        atomic.write_text(folder / "meta.json", json.dumps(meta, indent=2))
        (folder / "checkpoint.pt").unlink(missing_ok=True)
        return TrainedModel(name, model.eval(), meta, cached=False)
