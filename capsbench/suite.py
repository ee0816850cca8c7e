"""Suite files and what a run asks for: where suites are found, how a suite file, its preset
table and the request's overrides resolve into one checked configuration (``Resolved``)."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from capsbench.core.config import deep_merge, from_dict, parse_sets
from capsbench.core.device import resolve_device
from capsbench.core.errors import CapsbenchError
from capsbench.parts.base import PARTS
from capsbench.train.config import TrainConfig, check_data_options, data_options, default_preset, train_config


@dataclass(frozen=True)
class RunRequest:
    """What `run` was asked for, typed (the command line builds it; so can any caller)."""

    suite: str  # a suite name or a path to a suite TOML file
    preset: str | None = None  # None: full on a GPU, quick on a CPU
    seeds: tuple[int, ...] = ()  # empty: the suite's seed
    claims: tuple[str, ...] = ()  # claim ids to evaluate (empty: all for `paper`, none otherwise)
    models: tuple[str, ...] = ()  # empty: the suite's models
    sets: tuple[str, ...] = ()  # KEY=VALUE overrides
    out: str | None = None  # the run folder (None: results/<suite>/<time>-<id>/)
    device: str = "auto"
    progress: bool = True
    data_dir: str | None = None  # the cache folder (None: $CAPSBENCH_DATA_DIR or ~/.cache/capsbench)
    executor: str = "local"  # local | ray
    ray_address: str | None = None  # None: a local Ray instance; auto; HOST:PORT; ray://HOST:PORT
    ray_task_cpus: int | None = None  # CPUs per Ray task on a CPU cluster (None: this process's torch threads)
    track: str | None = None  # None | mlflow
    track_uri: str | None = None  # the tracking store (None: ./mlruns)


TOP_KEYS = {"description", "models", "parts", "seed", "test_n", "train", "model", "preset", "skip_claims"}


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


@dataclass(frozen=True)
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
    skip_claims: dict[str, str] = field(default_factory=dict)  # claim id -> why this preset leaves it out

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.name, "description": self.description, "preset": self.preset,
            "device": str(self.device), "seed": self.train.seed, "test_n": self.test_n,
            "models": list(self.models), "parts": list(self.parts), "train": asdict(self.train),
            "model": self.models, **{k: asdict(v) for k, v in self.parts.items()},
            **({"skip_claims": self.skip_claims} if self.skip_claims else {}),
        }  # fmt: skip


def _check_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CapsbenchError(f"{key} must be a non-empty list of names, got {value!r}")
    return value


def resolve(raw: dict[str, Any], name: str, req: RunRequest, device: torch.device | None = None) -> Resolved:
    """Layers: suite file, its [preset.<name>] table, then the request's sets / models / seed.
    ``device``: the executor's (a Ray cluster's GPUs), instead of resolving req.device here."""
    from capsbench.models import model_name, model_options

    device = device or resolve_device(req.device)
    preset = req.preset or default_preset(device)
    presets = raw.get("preset", {})
    if not isinstance(presets, dict):
        raise CapsbenchError("suite key 'preset' must be a table of per-preset overrides")
    merged = deep_merge({k: v for k, v in raw.items() if k != "preset"}, presets.get(preset, {}))
    merged = deep_merge(merged, parse_sets(list(req.sets)))
    if req.models:
        merged["models"] = list(req.models)
    unknown = sorted(set(merged) - TOP_KEYS - set(PARTS.names()))
    if unknown:
        allowed = ", ".join(sorted(TOP_KEYS - {"preset"}) + PARTS.names())
        raise CapsbenchError(f"unknown suite key {unknown[0]!r}; allowed top-level keys: {allowed}")
    train_over = dict(merged.get("train", {}))
    seed = req.seeds[0] if req.seeds else merged.get("seed", train_over.get("seed", 0))
    train_over["seed"] = seed
    train = train_config(preset, **train_over)
    models = {}
    model_tables = merged.get("model", {})
    for spec in _check_list(merged.get("models"), "models"):
        m = model_name(spec)  # a registered name; a user's FILE.py:NAME is loaded and registered
        check_data_options(m, model_tables.get(m, {}), train)
        models[m] = model_options(m, **{**data_options(m, train), **model_tables.get(m, {})})
    stray = sorted(set(model_tables) - set(models))
    if stray:
        raise CapsbenchError(f"[model.{stray[0]}] configures a model the suite does not run ({', '.join(models)})")
    parts = {p: part_config(p, preset, merged) for p in _check_list(merged.get("parts"), "parts")}
    check_datasets(list(parts), train.dataset)
    precheck_parts(parts, models)
    for p in set(PARTS.names()) - set(parts):
        if p in merged:  # validate tables of parts not run, so typos never pass silently
            part_config(p, preset, merged)
    test_n = merged.get("test_n", 10000)
    if not isinstance(test_n, int) or isinstance(test_n, bool) or test_n < 0:
        raise CapsbenchError(f"test_n must be an integer >= 0 (0 = the whole test set), got {test_n!r}")
    skip = skipped_claims(merged.get("skip_claims", {}))
    return Resolved(name, str(merged.get("description", "")), preset, device, train, models, parts, test_n, skip)


def check_datasets(parts: list[str], dataset: str) -> None:
    """Refuse a part on a dataset it does not declare (its numbers would be wrong, not just other)."""
    for p in parts:
        takes = PARTS.get(p).datasets
        if takes is not None and dataset not in takes:
            built = "MNIST's digits" if takes == ("mnist",) else "that data"
            raise CapsbenchError(f"part {p} runs on {', '.join(takes)} only (its protocol is built on {built}), "
                                 f"not train.dataset={dataset}; parts for any dataset: "
                                 f"{', '.join(n for n in PARTS.names() if PARTS.get(n).datasets is None)}")  # fmt: skip


def part_config(name: str, preset: str, merged: dict[str, Any]) -> Any:
    """Part ``name``'s config: its defaults, its own sizes for ``preset``, then the suite's table
    (already merged with its [preset.<name>] table and --set)."""
    part = PARTS.get(name)
    return from_dict(part.config, deep_merge(part.sized(preset), merged.get(name, {})), where=name)


def skipped_claims(raw: Any) -> dict[str, str]:
    """``[skip_claims]``: claim id -> the reason this suite or preset leaves it out (a sentence)."""
    from capsbench.report.claims import load_claims

    if raw == {}:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise CapsbenchError(f"skip_claims must be a table of claim id = \"reason\", got {raw!r}")
    known = load_claims()
    bad = [c for c in raw if c not in known]
    if bad:
        raise CapsbenchError(f"skip_claims: unknown claim {bad[0]!r}; known claims: {', '.join(known)}")
    return dict(raw)


def precheck_parts(parts: dict[str, Any], models: dict[str, dict[str, Any]]) -> None:
    """Each part's checks of its config against the run's models, built on the meta device (no
    memory, no weights), so that e.g. an attack loss no model provides fails before any work."""
    import torch

    from capsbench.models import build_model

    checks = [(PARTS.get(p).precheck, cfg) for p, cfg in parts.items() if PARTS.get(p).precheck]
    if not checks:
        return
    with torch.device("meta"):
        built = {m: build_model(m, **opts) for m, opts in models.items()}
    for fn, cfg in checks:
        fn(cfg, built)
