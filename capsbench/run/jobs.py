"""A run's training jobs: every (model, options, training config or recipe, seed) the run's
models and parts will ask the cache for, one job per cache key, so that an executor can train
them all (one after another, or as Ray tasks) before any part runs."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from capsbench.parts.base import PARTS
from capsbench.run.evaluate import for_seed, needs_training, seed_parts
from capsbench.suite import Resolved, RunRequest


@dataclass(frozen=True)
class TrainJob:
    """One model to train (or find in the cache)."""

    name: str  # the model
    spec: Any  # TrainConfig (MNIST) or a part's Recipe (MultiMNIST)
    options: dict[str, Any]  # model options
    seed: int
    key: str  # its cache key
    folder: str  # its cache folder, relative to the cache root ("models/<name>-<key>")
    label: str  # for progress lines: "capsnet (seed 0)", "table1 capsnet (seed 1)"

    def run(self, device: torch.device, root: str | None, data: Any, progress: bool) -> JobOutcome:
        """Train the model here (or find it in the cache); the entry is in the cache afterwards."""
        from capsbench.train.cache import get_trained

        t0 = time.perf_counter()
        tm = get_trained(self.name, self.spec, device, self.options, root=root, progress=progress, data=data)
        wall = time.perf_counter() - t0
        return JobOutcome(self.key, tm.cached, wall, tm.meta.get("test_accuracy"), tm.meta.get("test_n"))


@dataclass(frozen=True)
class JobOutcome:
    key: str
    cached: bool  # found in the cache: this run did not train it
    seconds: float  # wall time of the job
    test_accuracy: float | None = None
    test_n: int | None = None

    def line(self, job: TrainJob, where: str = "") -> str:
        how = "cached" if self.cached else f"trained in {self.seconds:.0f}s"
        acc = "" if self.test_accuracy is None else f", test accuracy {self.test_accuracy:.4f} (n={self.test_n})"
        return f"  {job.label}: {how}{where}{acc}"


def option_text(name: str, options: dict[str, Any]) -> str:
    """The model options a part sets in a job's label (" [routing_iters=1, reconstruction=False]"),
    so Table 1's variants of one model tell apart: those unlike the model's defaults, input size aside."""
    from capsbench.models import model_options

    defaults = model_options(name)
    shown = [f"{k}={v}" for k, v in options.items() if k != "input_size" and defaults.get(k) != v]
    return f" [{', '.join(shown)}]" if shown else ""


def make_job(name: str, spec: Any, options: dict[str, Any], seed: int, device: torch.device, label: str,
             root: str | None) -> TrainJob:  # fmt: skip
    from capsbench.data import cache_dir
    from capsbench.train.cache import locate

    full, key, folder = locate(name, spec, device, options, root)
    return TrainJob(name, spec, full, seed, key, str(folder.relative_to(cache_dir(root))), label)


def training_jobs(r: Resolved, req: RunRequest, seeds: list[int], data: Any) -> list[TrainJob]:
    """Every model the run trains, in the order a local run would train them, once per cache key."""
    jobs: dict[str, TrainJob] = {}
    for i, seed in enumerate(seeds):
        rs, parts = for_seed(r, seed), seed_parts(r, i)
        tag = f" (seed {seed})"
        found = [(n, rs.train, o, n + tag) for n, o in rs.models.items()] if needs_training(parts) else []
        hooks = [(p, cfg) for p, cfg in parts.items() if PARTS.get(p).jobs]
        if hooks:
            ctx = plan_context(rs, req, data)
            found += [(n, spec, o, f"{p} {n}{option_text(n, o)}{tag}") for p, cfg in hooks
                      for n, spec, o in PARTS.get(p).jobs(ctx, cfg)]  # fmt: skip
        for name, spec, options, label in found:
            job = make_job(name, spec, options, seed, r.device, label, req.data_dir)
            jobs.setdefault(job.key, job)
    return list(jobs.values())


def plan_context(r: Resolved, req: RunRequest, data: Any) -> Any:
    """What a part's jobs hook reads: the protocol, the run's device and precision, MNIST, and each
    model's name and options (no weights: the driver of a GPU cluster may have no GPU)."""
    from capsbench.core.device import amp_dtype
    from capsbench.parts.base import RunContext
    from capsbench.train.cache import TrainedModel

    models = {n: TrainedModel(n, None, {"model": n, "options": o}, cached=False)  # type: ignore[arg-type]
              for n, o in r.models.items()}  # fmt: skip
    return RunContext(models=models, test_x=data.test_x[:0], test_y=data.test_y[:0], train_cfg=r.train,
                      device=r.device, dtype=amp_dtype(r.device, r.train.amp), seed=r.train.seed,
                      progress=req.progress, data=data, cache_root=req.data_dir)  # fmt: skip


def train_here(jobs: list[TrainJob], device: torch.device, req: RunRequest, data: Any) -> dict[str, JobOutcome]:
    """Train the jobs one after another in this process (the local executor, and every torchrun
    rank); returns each job's outcome by key."""
    from capsbench.train import distributed

    main = distributed.current().main
    outcomes = {}
    for job in jobs:
        outcomes[job.key] = out = job.run(device, req.data_dir, data, req.progress)
        if main:
            print(out.line(job), file=sys.stderr)
    return outcomes


def fresh_keys(outcomes: dict[str, JobOutcome]) -> frozenset[str]:
    """The cache keys this run trained (the rest came from the cache)."""
    return frozenset(k for k, o in outcomes.items() if not o.cached)


def jobs_table(jobs: list[TrainJob], outcomes: dict[str, JobOutcome], runs: list[Any]) -> pd.DataFrame:
    """tables/jobs.csv: every training job and every (seed, part) with its wall time, the data
    for sizing a cluster (docs/scaling.md)."""
    from capsbench.parts.base import JOB_COLUMNS

    rows = [{"phase": "train", "task": j.label, "seed": j.seed, "seconds": outcomes[j.key].seconds,
             "from_cache": outcomes[j.key].cached} for j in jobs]  # fmt: skip
    rows += [{"phase": "evaluate", "task": part, "seed": run.seed, "seconds": res.seconds, "from_cache": False}
             for run in runs for part, res in run.results.items()]  # fmt: skip
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def cache_path(root: str | None, job: TrainJob) -> Path:
    from capsbench.data import cache_dir

    return cache_dir(root) / job.folder
