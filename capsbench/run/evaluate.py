"""One seed's evaluation, the same under every executor: the run's models from the cache (trained
before, by the training phase), the clean accuracy and training record, and each part."""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import torch

from capsbench.core.device import amp_dtype
from capsbench.parts.base import PARTS, PartResult, RunContext
from capsbench.suite import Resolved, RunRequest

FigureSink = Callable[[str, Any], None]  # (figure name, matplotlib Figure) -> None: write or keep it


@dataclass
class SeedRun:
    """What one seed produced: its models' metadata, clean accuracies and part results."""

    seed: int
    metas: dict[str, dict[str, Any]]  # model name -> its cache metadata (params, options, ...)
    clean: Any = None  # DataFrame or None
    results: dict[str, PartResult] = field(default_factory=dict)
    record: Any = None  # DataFrame of how well each trained model was trained (tables/models.csv), or None


def for_seed(r: Resolved, seed: int) -> Resolved:
    return dataclasses.replace(r, train=dataclasses.replace(r.train, seed=seed))


def seed_parts(r: Resolved, index: int) -> dict[str, Any]:
    """The parts of the ``index``-th seed: parts whose numbers do not depend on the seed
    (throughput) run once, with the first seed."""
    return {p: c for p, c in r.parts.items() if index == 0 or PARTS.get(p).per_seed}


def needs_training(parts: dict[str, Any]) -> bool:
    return any(PARTS.get(p).needs_training for p in parts)


def untrained(r: Resolved) -> dict[str, Any]:
    """Freshly initialised models (seeded) for parts whose numbers do not depend on the weights."""
    from capsbench.models import build_model
    from capsbench.train.cache import TrainedModel

    models = {}
    for name, options in r.models.items():
        torch.manual_seed(r.train.seed)
        model = build_model(name, **options).to(r.device).eval()
        meta = {"model": name, "options": options, "params": model.num_params(), "trained": False}
        models[name] = TrainedModel(name, model, meta, cached=False)
    return models


def context(r: Resolved, req: RunRequest, data: Any, trained: bool, fresh: frozenset[str] = frozenset()) -> RunContext:
    """The RunContext of r's seed: the trained models from the cache (``cached`` False for the
    keys in ``fresh``, which this run trained), or untrained ones, and the test images on the device."""
    from capsbench.train.cache import get_trained

    models = {} if trained else untrained(r)
    for name, options in r.models.items() if trained else ():
        tm = get_trained(name, r.train, r.device, options, root=req.data_dir, progress=req.progress, data=data)
        tm.cached = tm.cached and tm.meta["key"] not in fresh
        models[name] = tm
    n = r.test_n or len(data.test_x)
    return RunContext(
        models=models, test_x=data.test_x[:n].to(r.device), test_y=data.test_y[:n].to(r.device),
        train_cfg=r.train, device=r.device, dtype=amp_dtype(r.device, r.train.amp), seed=r.train.seed,
        progress=req.progress, data=data, cache_root=req.data_dir, fresh=fresh,
    )  # fmt: skip


def run_part(ctx: RunContext, part: str, cfg: Any, sink: FigureSink, suffix: str) -> PartResult:
    """Run one part; its figures go to ``sink`` (named with ``suffix``) and are then dropped."""
    t0 = time.perf_counter()
    res = PARTS.get(part).run(ctx, cfg)
    for name, fig in res.figures.items():
        sink(name + suffix, fig)
    res.figures = {}  # written; free the memory
    res.seconds = time.perf_counter() - t0
    print(f"  {part}: done in {res.seconds:.1f}s", file=sys.stderr)
    return res


def models_tables(r: Resolved, ctx: RunContext, trained: bool) -> tuple[Any, Any]:
    """(clean accuracy, training record) DataFrames of the seed's models, or (None, None) untrained."""
    return (clean_table(ctx), training_table(r, ctx)) if trained else (None, None)


def run_seed(r: Resolved, req: RunRequest, parts: dict[str, Any], data: Any, fresh: frozenset[str],
             sink: FigureSink, suffix: str) -> SeedRun:  # fmt: skip
    """Evaluate r's seed in this process: its models, then ``parts`` one after another."""
    trained = needs_training(parts)
    ctx = context(r, req, data, trained, fresh)
    clean, record = models_tables(r, ctx, trained)
    results = {part: run_part(ctx, part, cfg, sink, suffix) for part, cfg in parts.items()}
    return SeedRun(r.train.seed, metas(ctx), clean, results, record)


def metas(ctx: RunContext) -> dict[str, dict[str, Any]]:
    return {name: tm.meta for name, tm in ctx.models.items()}


def training_table(r: Resolved, ctx: RunContext) -> pd.DataFrame:
    """How well each model was trained (images seen, epochs, final accuracy, convergence, floor)."""
    from capsbench.train.convergence import RECORD_COLUMNS, training_record

    n = len(ctx.data.train_x)
    rows = [training_record(name, tm.meta, r.train, n, ctx.seed, tm.cached) for name, tm in ctx.models.items()]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def clean_table(ctx: RunContext) -> pd.DataFrame:
    """Clean test accuracy of every model on the run's test images."""
    from capsbench.train.tasks import evaluate

    rows = []
    for name, tm in ctx.models.items():
        acc, n = evaluate(tm.model, ctx.test_x, ctx.test_y, ctx.test_inputs, dtype=ctx.dtype)
        rows.append({"model": name, "accuracy": acc, "n": n, "seed": ctx.seed, "params": tm.meta["params"]})
    return pd.DataFrame(rows)
