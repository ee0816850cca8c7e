"""`run SUITE`: resolve the suite, train or reuse the models (every training job first, through
the executor: this process, torchrun ranks or a Ray cluster), run the parts for every seed, and
write a new run folder (config.toml, env.json, tables/, plots/, claims.csv, summary.md, report)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from capsbench.core import atomic
from capsbench.core.config import to_toml
from capsbench.core.errors import CapsbenchError
from capsbench.report.folder import check_out, new_run_folder, staged, write_figure, write_png, write_table
from capsbench.report.summary import PAPER_GRADE
from capsbench.run.evaluate import SeedRun, needs_training
from capsbench.suite import Resolved, RunRequest, find_suite, read_suite


def print_plan(r: Resolved, seeds: list[int], where: str) -> None:
    t = r.train
    if r.preset == "full" or t.paper_protocol:
        quick = "" if r.preset == "full" else "  (the paper's training protocol)"
    elif t.floor >= PAPER_GRADE:
        quick = f"  (paper-grade models, accuracy floor {100 * t.floor:g}%; the summary says how the protocol differs)"
    else:
        quick = "  (a reduced protocol: not comparable to the paper's)"
    print(f"suite {r.name}: {r.description}")
    print(f"  preset {r.preset}{quick}; {where}; seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}")
    if needs_training(r.parts):
        print(f"  training on {t.dataset}: {t.steps} steps x batch {t.batch_size} per model, augment={t.augment}"
              f"{f' (canvas {t.canvas}x{t.canvas})' if t.augment == 'canvas' else f' (+-{t.max_shift} px)' if t.augment == 'shift' else ''},"
              f" input {t.input_size}x{t.input_size}")  # fmt: skip
    else:  # e.g. viewpoints (its own 32x32 models per split), throughput (untrained weights)
        print("  no models trained for the run itself: its parts train their own or time untrained weights")
    print(f"  models: {', '.join(r.models)}; parts: {', '.join(r.parts)}")
    for cid, why in r.skip_claims.items():
        print(f"  left out: claim {cid}: {why}")


class FolderFigures:
    """Where a run's figures go: plots/<name>.png in the run folder, listed in ``files``."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.files = folder, []

    def __call__(self, name: str, fig: Any) -> None:
        self.files.append(write_figure(self.folder, name, fig))

    def png(self, name: str, data: bytes) -> None:
        self.files.append(write_png(self.folder, name, data))


@contextmanager
def phase(what: str) -> Iterator[None]:
    """Say on stderr what the run is doing, then how long it took."""
    print(f"{what} ...", file=sys.stderr)
    t0 = time.perf_counter()
    yield
    print(f"  {what}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def open_executor(req: RunRequest) -> Any:
    """The executor ``req`` names; Ray is imported and joined here, before any work or file."""
    if req.ray_task_cpus is not None and req.ray_task_cpus < 1:
        raise CapsbenchError(f"--ray-task-cpus {req.ray_task_cpus}: give the CPUs per task as a whole number, 1 or more")
    if req.executor == "local":
        if req.ray_address or req.ray_task_cpus is not None:
            raise CapsbenchError("--ray-address and --ray-task-cpus need --executor ray")
        from capsbench.run.local import LocalExecutor

        return LocalExecutor()
    if req.executor == "ray":
        from capsbench.run.ray_cluster import RayExecutor

        return RayExecutor(req.ray_address, req.ray_task_cpus)
    raise CapsbenchError(f"unknown executor {req.executor!r}; use local or ray")


def run(req: RunRequest) -> Path | None:
    """Resolve the suite, train the models (or find them in the cache), run the parts per seed and
    write the run folder; returns the folder (None on torchrun ranks other than 0)."""
    from capsbench.parts import load_parts
    from capsbench.run.track import open_tracker

    load_parts()
    check_out(req.out)  # not after an hour of training
    tracker = open_tracker(req.track, req.track_uri)
    path = find_suite(req.suite)
    raw = read_suite(path)
    executor = open_executor(req)
    try:
        return run_with(executor, tracker, raw, path.stem, req)
    finally:
        executor.close()


def run_with(executor: Any, tracker: Any, raw: dict[str, Any], name: str, req: RunRequest) -> Path | None:
    from capsbench.data.datasets import load_dataset
    from capsbench.run.plan import make_plan, resolve_run, run_seeds

    r, claims = resolve_run(raw, name, req, executor.device(req.device))
    executor.check(r)
    if executor.main:
        print_plan(r, list(run_seeds(r, req)), executor.describe(r.device))
    started = time.perf_counter()
    data = load_dataset(r.train.dataset, req.data_dir)
    plan = make_plan(r, claims, req, data)
    env = {**run_environment(plan.suite), **executor.environment(plan.device)}
    outcomes = executor.train(plan, data)
    if not executor.main:
        return None  # torchrun: rank 0 evaluates and writes
    reserved = not (req.out and Path(req.out).exists())  # this run creates the folder (else: an empty --out)
    folder = new_run_folder(plan.suite.name, req.out)
    with staged(folder, reserved) as work:  # the folder appears whole, or not at all
        runs, wall = write_run(work, folder, executor, plan, env, data, outcomes, started)
    for seed, check in ((sr.seed, c) for sr in runs for res in sr.results.values() for c in res.checks if not c.passed):
        print(f"warning: sanity check failed (seed {seed}): {check.name}: {check.detail}", file=sys.stderr)
    print(f"done in {wall:.0f}s; summary: {folder / 'summary.md'}; report: {folder / 'report.html'}")
    if tracker is not None:
        print(tracker.log(folder, plan.suite.name))
    return folder


def write_run(work: Path, folder: Path, executor: Any, plan: Any, env: dict[str, Any], data: Any, outcomes: dict,
              started: float) -> tuple[list[SeedRun], float]:  # fmt: skip
    """Evaluate every seed into ``work`` (the staging folder that becomes ``folder``): config,
    environment, tables, plots, claims, summary and report; returns the seeds' runs and the wall time."""
    from capsbench.report.document import write_report
    from capsbench.report.summary import render_summary
    from capsbench.run.jobs import fresh_keys, jobs_table

    r, claims = plan.suite, plan.claims
    chosen = {"claims": [c.id for c in claims]} if claims else {}
    atomic.write_text(work / "config.toml", to_toml({**r.as_dict(), "seeds": list(plan.seeds), **chosen}))
    atomic.write_text(work / "env.json", json.dumps(env, indent=2, default=str))
    figures = FolderFigures(work)
    runs = executor.evaluate(plan, data, fresh_keys(outcomes), figures)
    merged = {**merge_tables(runs), "jobs": jobs_table(list(plan.jobs), outcomes, runs)}
    with phase("writing tables, summary and report"):
        files = [write_table(work, name, df) for name, df in merged.items()] + figures.files
        claims_df = evaluate_claims(list(claims), merged, r) if claims is not None else None
        if claims_df is not None:
            atomic.write_with(work / "claims.csv", lambda tmp: claims_df.to_csv(tmp, index=False))
        wall = time.perf_counter() - started
        atomic.write_text(work / "summary.md", render_summary(r, env, runs, merged, claims_df, files, wall))
        write_report([work], work, shown_as=[folder])
    return runs, wall


def merge_tables(runs: list[SeedRun]) -> dict[str, pd.DataFrame]:
    """Every seed's tables (models, clean and each part's), concatenated over the seeds."""
    tables: dict[str, list[pd.DataFrame]] = {}
    for run in runs:
        for name, df in (("models", run.record), ("clean", run.clean)):
            if df is not None:
                tables.setdefault(name, []).append(df)
        for res in run.results.values():
            for name, df in res.tables.items():
                tables.setdefault(name, []).append(df if "seed" in df.columns else df.assign(seed=run.seed))
    return {name: pd.concat(dfs, ignore_index=True) for name, dfs in tables.items()}


def evaluate_claims(claims: list, tables: dict[str, Any], r: Resolved):
    """claims.csv: a verdict per evaluated claim, and a "not run" row per claim the preset left out."""
    from capsbench.report.claims import claim_row, not_run_row, select

    rows = [claim_row(c, tables, r.preset, r.train.paper_protocol) for c in claims]
    for c in select(",".join(r.skip_claims)) if r.skip_claims else []:
        rows.append(not_run_row(c, f"left out by suite {r.name}, preset {r.preset}: {r.skip_claims[c.id]}"))
    return pd.DataFrame(rows)


def run_environment(r: Resolved) -> dict[str, Any]:
    """env.json: versions, the driver's device (the run's where this process has it), git commit."""
    from capsbench.core.env import environment

    here = r.device.type == "cpu" or torch.cuda.is_available()
    env = environment(r.device if here else torch.device("cpu"))
    env.update({"suite": r.name, "preset": r.preset, "seed": r.train.seed, "started_utc": datetime.now(timezone.utc).isoformat()})
    return env


