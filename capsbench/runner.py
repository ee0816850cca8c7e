"""`run SUITE`: resolve the suite, train or reuse the models, run the parts for every seed, and
write a new run folder (config.toml, env.json, tables/, plots/, claims.csv, summary.md, report)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from capsbench.core import atomic
from capsbench.core.config import to_toml
from capsbench.core.device import amp_dtype, describe
from capsbench.core.errors import CapsbenchError
from capsbench.parts.base import PARTS, PartResult, RunContext
from capsbench.report.folder import new_run_folder, write_figure, write_table
from capsbench.suite import Resolved, RunRequest, find_suite, read_suite, resolve


def print_plan(r: Resolved, seeds: list[int]) -> None:
    t = r.train
    quick = "" if r.preset == "full" else "  (not comparable to the paper's protocol)"
    print(f"suite {r.name}: {r.description}")
    print(f"  preset {r.preset}{quick}; device {describe(r.device)}; seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}")
    print(f"  training: {t.steps} steps x batch {t.batch_size} per model, augment={t.augment}"
          f"{f' (canvas {t.canvas}x{t.canvas})' if t.augment == 'canvas' else f' (+-{t.max_shift} px)' if t.augment == 'shift' else ''},"
          f" input {t.input_size}x{t.input_size}")  # fmt: skip
    print(f"  models: {', '.join(r.models)}; parts: {', '.join(r.parts)}")
    for cid, why in r.skip_claims.items():
        print(f"  left out: claim {cid}: {why}")


@dataclass
class SeedRun:
    """What one seed produced: its models, clean accuracies and part results."""

    seed: int
    models: dict[str, Any]
    clean: Any  # DataFrame or None
    results: dict[str, PartResult]
    record: Any = None  # DataFrame of how well each trained model was trained (tables/models.csv), or None


def run(req: RunRequest) -> Path:
    """Resolve the suite, train or fetch the models, run the parts per seed and write the run
    folder; returns the folder."""
    from capsbench.parts import load_parts

    load_parts()
    path = find_suite(req.suite)
    r = resolve(read_suite(path), path.stem, req)
    seeds = list(req.seeds) or [r.train.seed]
    claims = claim_selection(r, req.claims)
    print_plan(r, seeds)
    folder = new_run_folder(r.name, req.out)
    started = time.perf_counter()
    atomic.write_text(folder / "config.toml", to_toml({**r.as_dict(), "seeds": seeds, **({"claims": [c.id for c in claims]} if claims else {})}))
    env = run_environment(r)
    atomic.write_text(folder / "env.json", json.dumps(env, indent=2, default=str))
    runs, tables, files = [], {}, []
    for i, seed in enumerate(seeds):
        if len(seeds) > 1:
            print(f"seed {seed} ({i + 1} of {len(seeds)})", file=sys.stderr)
        rs = dataclasses.replace(r, train=dataclasses.replace(r.train, seed=seed))
        # Parts whose numbers do not depend on the seed (throughput) run once, with the first seed.
        parts = {p: c for p, c in r.parts.items() if i == 0 or PARTS.get(p).per_seed}
        run = run_seed(rs, req, parts, folder, files, suffix=f"_seed{seed}" if len(seeds) > 1 else "")
        runs.append(run)
        for name, df in (("models", run.record), ("clean", run.clean)):
            if df is not None:
                tables.setdefault(name, []).append(df)
        for res in run.results.values():
            for name, df in res.tables.items():
                tables.setdefault(name, []).append(df if "seed" in df.columns else df.assign(seed=seed))
    merged = {name: pd.concat(dfs, ignore_index=True) for name, dfs in tables.items()}
    files[:0] = [write_table(folder, name, df) for name, df in merged.items()]
    claims_df = evaluate_claims(claims, merged, r) if claims is not None else None
    if claims_df is not None:
        atomic.write_with(folder / "claims.csv", lambda tmp: claims_df.to_csv(tmp, index=False))
    wall = time.perf_counter() - started
    from capsbench.report.document import write_report
    from capsbench.report.summary import render_summary

    atomic.write_text(folder / "summary.md", render_summary(r, env, runs, merged, claims_df, files, wall))
    write_report([folder], folder)
    for check in (c for run in runs for res in run.results.values() for c in res.checks if not c.passed):
        print(f"warning: sanity check failed (seed {run.seed}): {check.name}: {check.detail}", file=sys.stderr)
    print(f"done in {wall:.0f}s; summary: {folder / 'summary.md'}; report: {folder / 'report.html'}")
    return folder


def run_seed(r: Resolved, req: RunRequest, parts: dict[str, Any], folder: Path, files: list[str],
             suffix: str) -> SeedRun:  # fmt: skip
    """Train (or fetch) the models for r's seed, run ``parts``, and write their figures."""
    trained = any(PARTS.get(p).needs_training for p in parts)
    models, ctx = prepare(r, req, trained)
    clean = clean_table(ctx) if trained else None
    record = training_table(r, ctx) if trained else None
    results: dict[str, PartResult] = {}
    for part, cfg in parts.items():
        t0 = time.perf_counter()
        res = PARTS.get(part).run(ctx, cfg)
        for name, fig in res.figures.items():
            files.append(write_figure(folder, name + suffix, fig))
        res.figures = {}  # written; free the memory
        results[part] = res
        print(f"  {part}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return SeedRun(r.train.seed, models, clean, results, record)


def claim_selection(r: Resolved, ids: tuple[str, ...]) -> list | None:
    """The claims this run evaluates: --claims, or for the `paper` suite every claim its preset
    does not leave out (``skip_claims``), else None.

    --claims, and a preset that leaves claims out, narrow the run to the parts (and Table 1
    variants) the evaluated claims need."""
    from capsbench.report.claims import select

    if not ids and r.name != "paper":
        if r.skip_claims:
            raise CapsbenchError(f"skip_claims: suite {r.name} evaluates no claims (only `paper` does, or a run "
                                 "with --claims), so there is nothing to leave out; remove the table")  # fmt: skip
        return None
    claims = select(",".join(ids))
    if not ids and r.skip_claims:
        claims = [c for c in claims if c.id not in r.skip_claims]
    if ids or r.skip_claims:
        needed = {c.part for c in claims}
        missing = sorted(needed - set(r.parts))
        if missing:
            raise CapsbenchError(f"claim(s) need part {missing[0]!r}, which suite {r.name} does not run; "
                                 "use `run paper --claims ...`")  # fmt: skip
        r.parts = {p: c for p, c in r.parts.items() if p in needed}
        if "table1" in r.parts:
            wanted = [c.id for c in claims if c.part == "table1"]
            r.parts["table1"] = dataclasses.replace(r.parts["table1"], claims=wanted)
    if ids:
        r.skip_claims = {}  # claims asked for by name run, whatever the preset leaves out
    return claims


def evaluate_claims(claims: list, tables: dict[str, Any], r: Resolved):
    """claims.csv: a verdict per evaluated claim, and a "not run" row per claim the preset left out."""
    from capsbench.report.claims import claim_row, not_run_row, select

    rows = [claim_row(c, tables, r.preset) for c in claims]
    for c in select(",".join(r.skip_claims)) if r.skip_claims else []:
        rows.append(not_run_row(c, f"left out by suite {r.name}, preset {r.preset}: {r.skip_claims[c.id]}"))
    return pd.DataFrame(rows)


def run_environment(r: Resolved) -> dict[str, Any]:
    from capsbench.core.env import environment

    env = environment(r.device)
    env.update({"suite": r.name, "preset": r.preset, "seed": r.train.seed, "started_utc": datetime.now(timezone.utc).isoformat()})
    return env


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


def prepare(r: Resolved, req: RunRequest, trained: bool = True):
    """Load MNIST, train or fetch every model from the cache (if the parts need trained
    weights), and build the RunContext."""
    from capsbench.data import load_mnist
    from capsbench.train.cache import get_trained

    data = load_mnist(req.data_dir)
    models = {} if trained else untrained(r)
    for name, options in (r.models.items() if trained else []):
        t0 = time.perf_counter()
        tm = get_trained(name, r.train, r.device, options, root=req.data_dir, progress=req.progress, data=data)
        how = "cached" if tm.cached else f"trained in {time.perf_counter() - t0:.0f}s"
        print(f"  {name}: {how}, test accuracy {tm.test_accuracy:.4f} (n={tm.meta['test_n']})", file=sys.stderr)
        models[name] = tm
    n = r.test_n or len(data.test_x)
    ctx = RunContext(
        models=models, test_x=data.test_x[:n].to(r.device), test_y=data.test_y[:n].to(r.device),
        train_cfg=r.train, device=r.device, dtype=amp_dtype(r.device, r.train.amp), seed=r.train.seed,
        progress=req.progress, data=data, cache_root=req.data_dir,
    )  # fmt: skip
    return models, ctx


def training_table(r: Resolved, ctx: RunContext) -> pd.DataFrame:
    """How well each model was trained (images seen, epochs, final accuracy, convergence, floor)."""
    from capsbench.train.convergence import RECORD_COLUMNS, training_record

    n = len(ctx.data.train_x)
    rows = [training_record(name, tm.meta, r.train, n, ctx.seed, tm.cached) for name, tm in ctx.models.items()]
    return pd.DataFrame(rows, columns=RECORD_COLUMNS)


def clean_table(ctx: RunContext):
    """Clean test accuracy of every model on the run's test images."""
    from capsbench.train.tasks import evaluate

    rows = []
    for name, tm in ctx.models.items():
        acc, n = evaluate(tm.model, ctx.test_x, ctx.test_y, ctx.test_inputs, dtype=ctx.dtype)
        rows.append({"model": name, "accuracy": acc, "n": n, "seed": ctx.seed, "params": tm.meta["params"]})
    return pd.DataFrame(rows)
