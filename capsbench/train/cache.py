"""Cache of trained models, keyed by a hash of everything that determines the weights.

One ``get_trained`` for every kind of trained model, each described by a ``Recipe``: MNIST
classification under a TrainConfig (``MnistRecipe``, folders ``models/<name>-<key>``) and the
MultiMNIST part's (``parts.multimnist.MultiMnistRecipe``, ``models/multimnist-<name>-<key>``).
A recipe's key names its kind by its config's key ("train", "multimnist").

``<cache>/models/<prefix><name>-<key>/`` holds ``model.pt`` (state dict + metadata), ``meta.json``
(human-readable) and, while training, ``checkpoint.pt`` (so a killed run resumes). A file
lock makes two processes asking for the same model wait for one training run. Under torchrun every
rank trains and rank 0 alone writes (train/distributed.py). ``entry_files`` and ``install_entry``
move a finished entry between caches that share no storage (the Ray executor sends it as an object).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from capsbench.core import atomic
from capsbench.core.device import amp_dtype, dtype_label
from capsbench.core.env import environment
from capsbench.core.errors import CapsbenchError
from capsbench.core.lock import file_lock
from capsbench.data import cache_dir
from capsbench.data.datasets import load_dataset
from capsbench.models import BenchModel, build_model, model_options, weight_options
from capsbench.train import checkpoint, distributed
from capsbench.train.config import TrainConfig, check_data_options, data_options
from capsbench.train.tasks import MnistTask, Task
from capsbench.train.trainer import Trainer

# Bump when a change to the training code changes the weights it produces.
TRAIN_CODE_VERSION = 1


class Recipe(Protocol):
    """A kind of trained model: how ``get_trained`` keys, names, records and trains it."""

    prefix: ClassVar[str]  # of the cache folder's name: "" (MNIST), "multimnist-"
    seed: int  # of the initial weights
    input_size: int  # the model input its task gives (the input_size option's default)

    def key(self, device: torch.device) -> dict[str, Any]:
        """What determines the weights besides the model and its options: the task's config and
        kind, device, precision, code version."""

    def meta(self) -> dict[str, Any]:
        """The config fields meta.json records."""

    def label(self, name: str) -> str:
        """The progress label of training ``name``."""

    @property
    def batch_setting(self) -> tuple[str, int]:
        """(the suite key, the value) of the global batch size, which torchrun's ranks share."""

    def task(self, data: Any, device: torch.device) -> Task:
        """The Trainer's task on ``data`` (MNIST: train_x/train_y/test_x/test_y)."""


@dataclass(frozen=True)
class MnistRecipe:
    """Classification of ``cfg.dataset`` (MNIST unless set) under ``cfg`` (a TrainConfig given to
    get_trained means this); the dataset enters the key through ``cfg.weight_key()`` when not MNIST."""

    cfg: TrainConfig
    prefix: ClassVar[str] = ""

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    def key(self, device: torch.device) -> dict[str, Any]:
        cfg = self.cfg
        return {"train": cfg.weight_key(), "device": device.type,
                "precision": str(amp_dtype(device, cfg.amp, training=True)), "code": TRAIN_CODE_VERSION}  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {"train": self.cfg.weight_key(), "preset": self.cfg.description}

    def label(self, name: str) -> str:
        return name

    @property
    def batch_setting(self) -> tuple[str, int]:
        return "train.batch_size", self.cfg.batch_size

    def task(self, data: Any, device: torch.device) -> Task:
        return MnistTask(self.cfg, data, device)


def as_recipe(spec: TrainConfig | Recipe) -> Recipe:
    return MnistRecipe(spec) if isinstance(spec, TrainConfig) else spec


def recipe_data(recipe: Recipe, data: Any, root: str | Path | None) -> Any:
    """The data a recipe trains on: its TrainConfig's dataset, else the recipe's ``dataset``
    (MNIST for the MNIST parts' recipes, which have none), ``data`` when given (refused when it is
    another dataset), else loaded."""
    name = recipe.cfg.dataset if isinstance(recipe, MnistRecipe) else getattr(recipe, "dataset", "mnist")
    if data is None:
        return load_dataset(name, root)
    if getattr(data, "name", name) != name:
        raise CapsbenchError(f"asked to train on {name} with the {data.name} data loaded")
    return data


def cache_key(name: str, options: dict[str, Any], spec: TrainConfig | Recipe, device: torch.device) -> str:
    """A short hash of model, options (speed options left out) and the recipe's key: its task's
    config (for MNIST: training config, data protocol, seed), device, precision, code version."""
    payload = {"model": name, "options": weight_options(name, options), **as_recipe(spec).key(device)}
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


def locate(name: str, spec: TrainConfig | Recipe, device: torch.device, options: dict[str, Any] | None = None,
           root: str | Path | None = None) -> tuple[dict[str, Any], str, Path]:
    """(full model options, cache key, cache folder) of a model trained under ``spec``."""
    recipe = as_recipe(spec)
    if isinstance(recipe, MnistRecipe):  # the dataset decides input size, channels and classes
        check_data_options(name, options or {}, recipe.cfg)
        base = data_options(name, recipe.cfg)
    else:
        base = {"input_size": recipe.input_size}
    options = model_options(name, **{**base, **(options or {})})
    key = cache_key(name, options, recipe, device)
    return options, key, model_folder(recipe.prefix + name, key, root)


def get_trained(
    name: str, spec: TrainConfig | Recipe, device: torch.device, options: dict[str, Any] | None = None,
    root: str | Path | None = None, progress: bool = True, data: Any = None,
) -> TrainedModel:
    """Return the trained model from the cache, training it (or resuming training) first if needed;
    ``spec``: a TrainConfig (MNIST classification) or another kind's Recipe. Under torchrun every
    rank trains (rank 0 decides whether the cache holds the model, holds the lock and writes)."""
    recipe = as_recipe(spec)
    options, key, folder = locate(name, recipe, device, options, root)
    world = distributed.current()
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "lock") if world.main else contextlib.nullcontext():
        final = folder / "model.pt"
        if distributed.agree(world, final.exists()):
            return load_entry(name, options, final, device, world)
        torch.manual_seed(recipe.seed)  # initial weights are a function of the seed
        model = build_model(name, **options)
        data = recipe_data(recipe, data, root)
        task = recipe.task(data, device)
        trainer = Trainer(model, task, folder / "checkpoint.pt", progress, label=recipe.label(name))
        started = time.time()
        result = trainer.run()
        meta = {
            "model": name, "options": options, **recipe.meta(), "key": key, **result.fields(),
            "precision": dtype_label(task.dtype),  # training's autocast dtype
            "params": model.num_params(), "history": result.history, "created_unix": started,
            "env": environment(device),
        }  # fmt: skip
        meta = json.loads(json.dumps(meta, default=str))  # plain types only: loadable with weights_only
        if world.main:  # model.pt last: its presence makes the entry visible (ENTRY_FILES)
            atomic.write_text(folder / "meta.json", json.dumps(meta, indent=2))
            checkpoint.save(final, {"model": model.state_dict(), "meta": meta})
            (folder / "checkpoint.pt").unlink(missing_ok=True)
        return TrainedModel(name, model.eval(), meta, cached=False)


def load_entry(name: str, options: dict[str, Any], final: Path, device: torch.device,
               world: distributed.World | None = None) -> TrainedModel:  # fmt: skip
    """The cached model in ``final`` (model.pt), on ``device``. Under torchrun rank 0 reads it and
    sends it to the other ranks, whose nodes need not share its disk."""
    world = world or distributed.World()
    model = build_model(name, **options)
    state = distributed.from_main(world, checkpoint.load(final, map_location="cpu") if world.main else None)
    model.load_state_dict(state["model"])
    return TrainedModel(name, model.to(device).eval(), state["meta"], cached=True)


ENTRY_FILES = ("meta.json", "model.pt")  # model.pt last: its presence makes an entry visible


def entry_files(folder: Path) -> dict[str, bytes]:
    """A finished cache entry's files, to send to a cache on other storage (meta.json rebuilt from
    model.pt's copy where an entry lacks it: entries once wrote it after model.pt)."""
    meta = folder / "meta.json"
    if not meta.exists():
        atomic.write_text(meta, json.dumps(checkpoint.load(folder / "model.pt")["meta"], indent=2))
    return {f: (folder / f).read_bytes() for f in ENTRY_FILES}


def install_entry(folder: Path, files: dict[str, bytes]) -> bool:
    """Write an entry sent by ``entry_files`` unless the folder holds one; True if written."""
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / "lock"):
        if (folder / "model.pt").exists():
            return False
        for f in ENTRY_FILES:
            atomic.write_bytes(folder / f, files[f])
        return True
