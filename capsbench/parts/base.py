"""What a suite part receives and returns.

A part is a function ``run(ctx: RunContext, cfg: <PartConfig>) -> PartResult`` registered in
``PARTS`` by the ``@part(...)`` decorator with its config dataclass and its tables' columns. It returns flat rows (DataFrames) and figures; the runner
writes them atomically into the run folder and builds summary.md from the parts' sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from capsbench.core.config import from_dict
from capsbench.core.registry import Registry
from capsbench.report.headline import HEADLINES, Headline
from capsbench.report.tables import TABLES
from capsbench.train.config import TrainConfig
from capsbench.train.convergence import RECORD_COLUMNS


@dataclass
class Check:
    """A sanity check shown in the summary; a failing one is also printed as a warning."""

    name: str
    passed: bool
    detail: str  # the numbers behind the verdict
    key: str = ""  # a short id claims can name (e.g. "square"); "" = informational
    model: str = ""  # the model it is about ("" = the run)


@dataclass
class PartResult:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> rows, saved as tables/<name>.csv
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure, saved as plots/<name>.png
    summary: str = ""  # a Markdown section for summary.md (tables, notes)
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0  # the part's wall time (the runner's jobs table)


@dataclass
class RunContext:
    """Everything a part needs: trained models, test data on the device, the protocol, the seed."""

    models: dict[str, Any]  # name -> capsbench.train.cache.TrainedModel (eval mode, on device)
    test_x: Tensor  # (N, C, H, W) uint8 test images on the device (MNIST: (N, 1, 28, 28))
    test_y: Tensor  # (N,) int64 labels on the device
    train_cfg: TrainConfig  # the protocol the models were trained under (input size, canvas)
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype for evaluation (None = fp32)
    seed: int
    progress: bool = True
    data: Any = None  # the run's dataset (train_x/train_y/test_x/test_y), for parts that train their own models
    cache_root: str | None = None  # the cache folder (None: $CAPSBENCH_DATA_DIR or ~/.cache/capsbench)
    fresh: frozenset[str] = frozenset()  # cache keys this run trained (before its parts ran): not "from cache"

    def get_trained(self, name: str, spec: Any, options: dict[str, Any]) -> Any:
        """The part's own trained model (train.cache.get_trained on the run's device and cache);
        ``cached`` is False when this run trained it, before the parts ran or here."""
        from capsbench.train.cache import get_trained

        tm = get_trained(name, spec, self.device, options, root=self.cache_root, progress=self.progress, data=self.data)
        tm.cached = tm.cached and tm.meta["key"] not in self.fresh
        return tm

    @property
    def input_size(self) -> int:
        return self.train_cfg.input_size

    @property
    def num_classes(self) -> int:
        """The run's dataset's number of classes (10 for MNIST)."""
        from capsbench.train.config import dataset_spec

        return dataset_spec(self.train_cfg.dataset).num_classes

    @property
    def channels(self) -> int:
        """The run's dataset's image channels (1 for MNIST)."""
        from capsbench.train.config import dataset_spec

        return dataset_spec(self.train_cfg.dataset).shape[0]

    def test_inputs(self, x_u8: Tensor) -> Tensor:
        """Raw images -> model inputs (B, C, S, S) in [0, 1]: as they are, or centred on the canvas."""
        from capsbench.train.tasks import test_inputs

        return test_inputs(self.train_cfg, x_u8)


PartFn = Callable[[RunContext, Any], PartResult]
# The models a part trains itself, as (model name, TrainConfig or Recipe, model options), so that an
# executor can train them (in parallel, on a cluster) before the part runs; the context has no models.
JobsFn = Callable[[RunContext, Any], list[tuple[str, Any, dict[str, Any]]]]


@dataclass(frozen=True)
class Part:
    """A registered part: its name, config dataclass (the suite file's ``[name]`` table), run
    function, and the columns of every table it writes (declared once, here)."""

    name: str
    config: type
    run: PartFn
    tables: dict[str, tuple[str, ...]]  # table name -> its columns, in order
    needs_training: bool = True  # False: the part trains its own models, or needs none
    per_seed: bool = True  # False: its numbers do not depend on the seed (run with the first seed only)
    # Checks of the config against the run's models (built on the meta device: no weights), run
    # while the suite resolves, before any work: raise CapsbenchError with one clear line.
    precheck: Callable[[Any, dict[str, Any]], None] | None = None
    jobs: JobsFn | None = None  # the part's own training jobs (parts with needs_training=False)
    # Its sizes per training preset (preset -> config keys: test images, steps, budgets), stated
    # once here; the config's defaults are the `full` sizes, and suite files say only what differs.
    sizing: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The datasets (train.dataset) it gives right numbers on; None: any. MNIST alone unless a part
    # says more: a protocol built on MNIST's digits (a canvas, MNIST-C, two digits) is refused elsewhere.
    datasets: tuple[str, ...] | None = ("mnist",)

    def sized(self, preset: str) -> dict[str, Any]:
        """The config keys this part sets for ``preset``; a preset it does not size gets `full`'s."""
        return dict(self.sizing.get(preset, self.sizing.get("full", {})))


PARTS: Registry[Part] = Registry("suite part")
# The runner's own tables, for every run that trains models (beside each part's, registered by @part)
TABLES.register("models")(RECORD_COLUMNS)  # how well each model was trained (train/convergence.py)
TABLES.register("clean")(("model", "accuracy", "n", "seed", "params"))  # clean accuracy on the run's test images
JOB_COLUMNS = ("phase", "task", "seed", "seconds", "from_cache")  # every training job and part, timed
TABLES.register("jobs")(JOB_COLUMNS)


def part(name: str, config: type, tables: dict[str, tuple[str, ...]], needs_training: bool = True,
         per_seed: bool = True, precheck: Callable[[Any, dict[str, Any]], None] | None = None,
         jobs: JobsFn | None = None, sizing: Mapping[str, Mapping[str, Any]] | None = None,
         headline: Sequence[Headline] = (),
         datasets: Sequence[str] | None = ("mnist",)) -> Callable[[PartFn], PartFn]:  # fmt: skip
    """Register the decorated run function as part ``name``, with its tables' columns, its sizes
    per preset (checked against ``config`` here), its headline numbers and the datasets it takes
    (``datasets``: None = any; MNIST alone by default)."""

    def deco(fn: PartFn) -> PartFn:
        tabs = {k: tuple(v) for k, v in tables.items()}
        sizes = {preset: dict(keys) for preset, keys in (sizing or {}).items()}
        for preset, keys in sizes.items():  # a typo in a part's sizing fails at import, in every test
            from_dict(config, keys, where=f"{name} sizing for preset {preset}")
        stray = [h.table for h in headline if h.table not in tabs]
        if stray:
            raise ValueError(f"part {name}: headline reads table {stray[0]!r}, which it does not write")
        PARTS.register(name)(Part(name, config, fn, tabs, needs_training, per_seed, precheck, jobs, sizes,
                                  None if datasets is None else tuple(datasets)))
        for table, columns in tabs.items():
            TABLES.register(table, part=name)(columns)
        if headline:  # its numbers in the report's headline, the summary and MLflow (report/ reads the registry)
            HEADLINES.register(name)(tuple(headline))
        return fn

    return deco
