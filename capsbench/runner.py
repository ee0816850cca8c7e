"""`python -m capsbench run SUITE`: resolve the suite config, train or reuse the models, run the
parts, and write a new run folder (config.toml, env.json, tables/, plots/, summary.md)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from capsbench import atomic
from capsbench.config import deep_merge, from_dict, parse_sets, to_toml
from capsbench.device import amp_dtype, describe, resolve_device
from capsbench.errors import CapsbenchError
from capsbench.suites.base import PARTS, PartResult, RunContext
from capsbench.train.config import TrainConfig, train_config

TOP_KEYS = {"description", "models", "parts", "seed", "test_n", "train", "model", "preset"}


def suite_dirs() -> list[Path]:
    """Where suite names are looked up: the repository's suites/ (next to the package), then ./suites."""
    here = Path(__file__).resolve().parent.parent / "suites"
    return list(dict.fromkeys([here, Path.cwd() / "suites"]))


def known_suites() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in suite_dirs():
        for p in sorted(d.glob("*.toml")) if d.is_dir() else []:
            found.setdefault(p.stem, p)
    return found


def find_suite(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise CapsbenchError(f"suite file {p} does not exist")
        return p
    suites = known_suites()
    if name_or_path not in suites:
        raise CapsbenchError(f"unknown suite {name_or_path!r}; known suites: {', '.join(suites) or '(none)'}")
    return suites[name_or_path]


def read_suite(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CapsbenchError(f"suite file {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CapsbenchError(f"cannot read suite file {path}: {e}") from None


@dataclass
class Resolved:
    """A fully checked suite configuration; ``as_dict`` is what config.toml records."""

    name: str
    description: str
    preset: str
    device: torch.device
    train: TrainConfig
    models: dict[str, dict[str, Any]]  # name -> model options
    parts: dict[str, Any]  # part name -> its config dataclass
    test_n: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.name, "description": self.description, "preset": self.preset,
            "device": str(self.device), "seed": self.train.seed, "test_n": self.test_n,
            "models": list(self.models), "parts": list(self.parts), "train": asdict(self.train),
            "model": self.models, **{k: asdict(v) for k, v in self.parts.items()},
        }  # fmt: skip


def _check_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CapsbenchError(f"{key} must be a non-empty list of names, got {value!r}")
    return value


def resolve(raw: dict[str, Any], name: str, args: argparse.Namespace) -> Resolved:
    """Layers: suite file, its [preset.<name>] table, then --set / --models / --seed."""
    from capsbench.models import MODELS, model_options
    from capsbench.trainer_cli import default_preset

    device = resolve_device(getattr(args, "device", "auto"))
    preset = args.preset or default_preset(device)
    presets = raw.get("preset", {})
    if not isinstance(presets, dict):
        raise CapsbenchError("suite key 'preset' must be a table of per-preset overrides")
    merged = deep_merge({k: v for k, v in raw.items() if k != "preset"}, presets.get(preset, {}))
    merged = deep_merge(merged, parse_sets(args.set))
    if args.models:
        merged["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(merged) - TOP_KEYS - set(PARTS.names()))
    if unknown:
        allowed = ", ".join(sorted(TOP_KEYS - {"preset"}) + PARTS.names())
        raise CapsbenchError(f"unknown suite key {unknown[0]!r}; allowed top-level keys: {allowed}")
    train_over = dict(merged.get("train", {}))
    seed = args.seed if args.seed is not None else merged.get("seed", train_over.get("seed", 0))
    train_over["seed"] = seed
    train = train_config(preset, **train_over)
    models = {}
    model_tables = merged.get("model", {})
    for m in _check_list(merged.get("models"), "models"):
        MODELS.get(m)
        models[m] = model_options(m, **{"input_size": train.input_size, **model_tables.get(m, {})})
    stray = sorted(set(model_tables) - set(models))
    if stray:
        raise CapsbenchError(f"[model.{stray[0]}] configures a model the suite does not run ({', '.join(models)})")
    parts = {}
    for p in _check_list(merged.get("parts"), "parts"):
        cfg_cls, _ = PARTS.get(p)
        parts[p] = from_dict(cfg_cls, merged.get(p, {}), where=p)
    for p in set(PARTS.names()) - set(parts):
        if p in merged:  # validate tables of parts not run, so typos never pass silently
            from_dict(PARTS.get(p)[0], merged[p], where=p)
    test_n = merged.get("test_n", 10000)
    if not isinstance(test_n, int) or isinstance(test_n, bool) or test_n < 0:
        raise CapsbenchError(f"test_n must be an integer >= 0 (0 = the whole test set), got {test_n!r}")
    return Resolved(name, str(merged.get("description", "")), preset, device, train, models, parts, test_n)


def new_run_folder(suite: str, out: str | None) -> Path:
    """A fresh folder; an existing non-empty --out is refused (results are never overwritten)."""
    if out:
        folder = Path(out)
        if folder.exists() and any(folder.iterdir()):
            raise CapsbenchError(f"--out {folder} already holds files; results are never overwritten, choose a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = Path("results") / suite
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / f"{stamp}-{secrets.token_hex(3)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def print_plan(r: Resolved, seeds: list[int]) -> None:
    t = r.train
    quick = "" if r.preset == "full" else "  (not comparable to the paper's protocol)"
    print(f"suite {r.name}: {r.description}")
    print(f"  preset {r.preset}{quick}; device {describe(r.device)}; seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}")
    print(f"  training: {t.steps} steps x batch {t.batch_size} per model, augment={t.augment}"
          f"{f' (canvas {t.canvas}x{t.canvas})' if t.augment == 'canvas' else f' (+-{t.max_shift} px)' if t.augment == 'shift' else ''},"
          f" input {t.input_size}x{t.input_size}")  # fmt: skip
    print(f"  models: {', '.join(r.models)}; parts: {', '.join(r.parts)}")


def write_table(folder: Path, name: str, df) -> str:
    rel = f"tables/{name}.csv"
    atomic.write_with(folder / rel, lambda tmp: df.to_csv(tmp, index=False))
    return rel


def write_figure(folder: Path, name: str, fig) -> str:
    rel = f"plots/{name}.png"
    atomic.write_with(folder / rel, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return rel


def parse_seeds(args: argparse.Namespace) -> list[int] | None:
    """``--seeds 0,1,2`` as a list of distinct ints (None when not given)."""
    text = getattr(args, "seeds", None)
    if not text:
        return None
    if args.seed is not None:
        raise CapsbenchError("give either --seed or --seeds, not both")
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CapsbenchError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise CapsbenchError(f"--seeds needs distinct integers >= 0, got {text!r}")
    return seeds


@dataclass
class SeedRun:
    """What one seed produced: its models, clean accuracies and part results."""

    seed: int
    models: dict[str, Any]
    clean: Any  # DataFrame or None
    results: dict[str, PartResult]


def run_command(args: argparse.Namespace) -> int:
    from capsbench.suites import load_parts

    load_parts()
    path = find_suite(args.suite)
    seeds = parse_seeds(args)
    if seeds:
        args.seed = seeds[0]
    r = resolve(read_suite(path), path.stem, args)
    seeds = seeds or [r.train.seed]
    claims = claim_selection(r, getattr(args, "claims", None))
    print_plan(r, seeds)
    folder = new_run_folder(r.name, args.out)
    started = time.perf_counter()
    atomic.write_text(folder / "config.toml", to_toml({**r.as_dict(), "seeds": seeds, **({"claims": [c.id for c in claims]} if claims else {})}))
    env = run_environment(r, args)
    atomic.write_text(folder / "env.json", json.dumps(env, indent=2, default=str))
    runs, tables, files = [], {}, []
    for i, seed in enumerate(seeds):
        if len(seeds) > 1:
            print(f"seed {seed} ({i + 1} of {len(seeds)})", file=sys.stderr)
        rs = dataclasses.replace(r, train=dataclasses.replace(r.train, seed=seed))
        # Parts whose numbers do not depend on the seed (throughput) run once, with the first seed.
        parts = {p: c for p, c in r.parts.items() if i == 0 or PARTS.meta(p).get("per_seed", True)}
        run = run_seed(rs, args, parts, folder, files, suffix=f"_seed{seed}" if len(seeds) > 1 else "")
        runs.append(run)
        if run.clean is not None:
            tables.setdefault("clean", []).append(run.clean)
        for res in run.results.values():
            for name, df in res.tables.items():
                tables.setdefault(name, []).append(df if "seed" in df.columns else df.assign(seed=seed))
    merged = {name: pd.concat(dfs, ignore_index=True) for name, dfs in tables.items()}
    files[:0] = [write_table(folder, name, df) for name, df in merged.items()]
    claims_df = evaluate_claims(claims, merged, r.preset) if claims is not None else None
    if claims_df is not None:
        atomic.write_with(folder / "claims.csv", lambda tmp: claims_df.to_csv(tmp, index=False))
    wall = time.perf_counter() - started
    from capsbench.report import write_report
    from capsbench.summary import render_summary

    atomic.write_text(folder / "summary.md", render_summary(r, env, runs, merged, claims_df, files, wall))
    write_report([folder], folder)
    for check in (c for run in runs for res in run.results.values() for c in res.checks if not c.passed):
        print(f"warning: sanity check failed (seed {run.seed}): {check.name}: {check.detail}", file=sys.stderr)
    print(f"done in {wall:.0f}s; summary: {folder / 'summary.md'}; report: {folder / 'report.html'}")
    print(folder)
    return 0


def run_seed(r: Resolved, args: argparse.Namespace, parts: dict[str, Any], folder: Path, files: list[str],
             suffix: str) -> SeedRun:  # fmt: skip
    """Train (or fetch) the models for r's seed, run ``parts``, and write their figures."""
    trained = any(PARTS.meta(p).get("needs_training", True) for p in parts)
    models, ctx = prepare(r, args, trained)
    clean = clean_table(ctx) if trained else None
    results: dict[str, PartResult] = {}
    for part, cfg in parts.items():
        t0 = time.perf_counter()
        res = PARTS.get(part)[1](ctx, cfg)
        for name, fig in res.figures.items():
            files.append(write_figure(folder, name + suffix, fig))
        res.figures = {}  # written; free the memory
        results[part] = res
        print(f"  {part}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return SeedRun(r.train.seed, models, clean, results)


def claim_selection(r: Resolved, ids: str | None) -> list | None:
    """The claims this run evaluates: --claims, or every claim for the `paper` suite, else None.

    --claims also narrows the run to the parts (and Table 1 variants) those claims need."""
    from capsbench.claims import select

    if not ids and r.name != "paper":
        return None
    claims = select(ids)
    if ids:
        needed = {c.part for c in claims}
        missing = sorted(needed - set(r.parts))
        if missing:
            raise CapsbenchError(f"claim(s) need part {missing[0]!r}, which suite {r.name} does not run; "
                                 "use `run paper --claims ...`")  # fmt: skip
        r.parts = {p: c for p, c in r.parts.items() if p in needed}
        if "table1" in r.parts:
            wanted = [c.id for c in claims if c.part == "table1"]
            r.parts["table1"] = dataclasses.replace(r.parts["table1"], claims=wanted)
    return claims


def evaluate_claims(claims: list, tables: dict[str, Any], preset: str):
    from capsbench.claims import claim_row

    return pd.DataFrame([claim_row(c, tables, preset) for c in claims])


def run_environment(r: Resolved, args: argparse.Namespace) -> dict[str, Any]:
    from capsbench.env import environment

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


def prepare(r: Resolved, args: argparse.Namespace, trained: bool = True):
    """Load MNIST, train or fetch every model from the cache (if the parts need trained
    weights), and build the RunContext."""
    from capsbench.data import load_mnist
    from capsbench.train.cache import get_trained

    data = load_mnist(args.data_dir)
    models = {} if trained else untrained(r)
    for name, options in (r.models.items() if trained else []):
        t0 = time.perf_counter()
        tm = get_trained(name, r.train, r.device, options, root=args.data_dir, progress=not args.no_progress, data=data)
        how = "cached" if tm.cached else f"trained in {time.perf_counter() - t0:.0f}s"
        print(f"  {name}: {how}, test accuracy {tm.test_accuracy:.4f} (n={tm.meta['test_n']})", file=sys.stderr)
        models[name] = tm
    n = r.test_n or len(data.test_x)
    ctx = RunContext(
        models=models, test_x=data.test_x[:n].to(r.device), test_y=data.test_y[:n].to(r.device),
        train_cfg=r.train, device=r.device, dtype=amp_dtype(r.device, r.train.amp), seed=r.train.seed,
        progress=not args.no_progress, data=data, cache_root=args.data_dir,
    )  # fmt: skip
    return models, ctx


def clean_table(ctx: RunContext):
    """Clean test accuracy of every model on the run's test images."""
    from capsbench.train.loop import evaluate

    rows = []
    for name, tm in ctx.models.items():
        acc, n = evaluate(tm.model, ctx.test_x, ctx.test_y, ctx.test_inputs, dtype=ctx.dtype)
        rows.append({"model": name, "accuracy": acc, "n": n, "seed": ctx.seed, "params": tm.meta["params"]})
    return pd.DataFrame(rows)
