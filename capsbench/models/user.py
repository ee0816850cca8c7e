"""A researcher's own model, evaluated without editing capsbench.

Two ways in: a spec ``FILE.py:NAME`` (``run --models``, ``train``, a suite's ``models``) loads the
file and registers model ``FILE_STEM:NAME``; an entry point of the ``capsbench.models`` group,
``name = "pkg.module:builder"``, registers model ``name`` the first time that name is missing from
``MODELS``. Each gets a config dataclass of its own (``input_size``, ``num_classes``, the builder's
simple keyword arguments) whose ``source_sha256`` field puts a hash of the source file in the
weight cache key. A plain ``nn.Module`` returning logits (B, num_classes) is wrapped as a CNN.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.core.registry import Registry
from capsbench.models.base import BenchModel, ModelOutput, eval_mode
from capsbench.models.capsule import CAPSULE_ATTRIBUTES, CapsuleModel

GROUP = "capsbench.models"  # the entry-point group
SIMPLE = (bool, int, float, str)  # builder keyword arguments of these types become config fields
RESERVED = ("source", "source_sha256")


class ModelRegistry(Registry[tuple[type, Callable[[Any], BenchModel]]]):
    """The model registry: a name it lacks is looked for among the user's models (a file named by
    the model's ``source`` option, then the ``capsbench.models`` entry points) before refusing."""

    def get(self, name: str, source: str | None = None) -> tuple[type, Callable[[Any], BenchModel]]:
        if name not in self:
            find_missing(self, name, source)
        return super().get(name)

    def name_of(self, text: str) -> str:
        """``text`` if it is a model's name; a spec ``FILE.py:NAME`` is loaded and registered, and
        its model's name ``FILE_STEM:NAME`` returned. Relative paths are from the current folder."""
        if not is_spec(text):
            self.get(text)  # unknown: the registry's one line, with the known names
            return text
        return register_file(self, text)

    def load_entry_points(self) -> None:
        """Register every ``capsbench.models`` entry point not yet registered (for `list models`)."""
        for ep in entry_points():
            if ep.name not in self:
                register_entry_point(self, ep)


class UserCNN(BenchModel):
    """A plain ``nn.Module`` returning logits (B, C), trained and attacked with cross-entropy."""

    loss_name = "cross-entropy (attacks: cross-entropy on logits)"

    def __init__(self, net: nn.Module, input_size: int, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.num_classes = num_classes

    def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
        return ModelOutput(self.net(x).float())  # (B, C) logits

    def objective(self, out: ModelOutput, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.scores, y)

    def attack_loss(self, out: ModelOutput, y: Tensor) -> Tensor:
        return F.cross_entropy(out.scores.float(), y, reduction="none")


# ---- specs and entry points -----------------------------------------------------------------


def is_spec(text: str) -> bool:
    """Does ``text`` name a file (``FILE.py:NAME``, ``FILE.py``) rather than a model?"""
    if ":" not in text:
        return text.endswith(".py")
    left = text.rpartition(":")[0]
    return Path(left).suffix != "" or "/" in left or "\\" in left


def parse_spec(text: str) -> tuple[Path, str]:
    """``FILE.py:NAME`` -> (absolute path, NAME), refusing what cannot be such a spec."""
    path, sep, attr = text.rpartition(":")
    if not sep or not attr:
        raise CapsbenchError(f"model spec {text!r} names no builder: write FILE.py:NAME, e.g. mymodel.py:build")
    p = Path(path).expanduser().resolve()
    if p.suffix != ".py":
        raise CapsbenchError(f"model spec {text!r}: {path} is not a .py file; write FILE.py:NAME")
    if not p.is_file():
        raise CapsbenchError(f"model spec {text!r}: file {p} not found; check the path (relative to {Path.cwd()})")
    return p, attr


def load_builder(path: Path, attr: str, sha: str) -> Callable[..., Any]:
    """Run the file as a module of its own (a private name, so files with one stem can coexist)
    and return its callable ``attr``."""
    name = f"capsbench_user_{sha[:12]}_{path.stem}".replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module  # dataclasses and pickling look a class's module up here
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        sys.modules.pop(name, None)
        raise CapsbenchError(f"cannot load {path}: {type(e).__name__}: {first_line(e)}") from None
    return pick(module, attr, str(path))


def pick(module: Any, attr: str, where: str) -> Callable[..., Any]:
    if not hasattr(module, attr):
        found = ", ".join(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                          and getattr(v, "__module__", None) == module.__name__)  # fmt: skip
        raise CapsbenchError(f"{where} has no {attr!r}; callables defined there: {found or '(none)'}")
    fn = getattr(module, attr)
    if not callable(fn):
        what = f"not callable (a {type(fn).__name__})"
        raise CapsbenchError(f"{where}: {attr!r} is {what}; name a function or class that returns an nn.Module")
    return fn


def register_file(reg: ModelRegistry, text: str) -> str:
    """Register the model of spec ``text`` in ``reg`` (again, if its file changed) and return its name."""
    path, attr = parse_spec(text)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    name, source = f"{path.stem}:{attr}", f"{path}:{attr}"
    if name in reg:
        meta = reg.meta(name)
        if meta.get("source") == source and meta.get("source_sha256") == sha:
            return name
        if meta.get("source") != source:
            taken = meta.get("source", "a capsbench model")
            raise CapsbenchError(f"model name {name} is taken by {taken}; rename {path.name} or {attr}")
        reg.remove(name)  # the file changed: a new model under the same name
    register(reg, name, load_builder(path, attr, sha), source, sha)
    return name


def find_missing(reg: ModelRegistry, name: str, source: str | None) -> None:
    """Register ``name`` from the file its ``source`` option records (another process: a Ray
    task, a torchrun rank), else from a ``capsbench.models`` entry point of that name."""
    if source and source.rpartition(":")[0].endswith(".py"):  # a file's; an entry point's reads "entry point ..."
        if register_file(reg, source) != name:
            raise CapsbenchError(f"model {name}: its source {source} registers a model of another name")
        return
    for ep in entry_points():
        if ep.name == name:
            return register_entry_point(reg, ep)


def entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=GROUP))


def register_entry_point(reg: ModelRegistry, ep: importlib.metadata.EntryPoint) -> None:
    where = f"entry point {ep.name} = {ep.value!r} (group {GROUP})"
    try:
        fn = ep.load()
    except Exception as e:
        raise CapsbenchError(f"cannot load {where}: {type(e).__name__}: {first_line(e)}") from None
    if not callable(fn):
        raise CapsbenchError(f"{where} is not callable (a {type(fn).__name__}); point it at a builder")
    register(reg, ep.name, fn, f"entry point {ep.value}", source_hash(fn))


def source_hash(fn: Callable[..., Any]) -> str:
    """sha256 of the file that defines ``fn`` (of its name, where it has no file)."""
    try:
        return hashlib.sha256(Path(inspect.getfile(fn)).read_bytes()).hexdigest()
    except (TypeError, OSError):
        return hashlib.sha256(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}".encode()).hexdigest()


# ---- registration: a config dataclass and a checked builder --------------------------------


def register(reg: ModelRegistry, name: str, fn: Callable[..., Any], source: str, sha: str) -> None:
    """Put ``fn`` in ``reg`` as model ``name``, after one checked build on the meta device."""
    cfg_cls = config_class(name, fn, source, sha)
    build = checked_builder(name, fn)
    probe_build(build, cfg_cls())
    desc = f"your model {source} (sha256 {sha[:12]})"
    reg.register(name, description=desc, source=source, source_sha256=sha)((cfg_cls, build))


def builder_params(name: str, fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The builder's keyword parameters; one without a default it cannot be called with is refused."""
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}
    for p in params.values():
        needed = p.default is inspect.Parameter.empty and p.name not in ("input_size", "num_classes")
        if needed and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise CapsbenchError(f"model {name}: builder argument {p.name!r} has no default; give it one "
                                 "(capsbench passes only keyword options)")  # fmt: skip
    return params


def config_class(name: str, fn: Callable[..., Any], source: str, sha: str) -> type:
    """A frozen dataclass: input_size, num_classes, the builder's simple keyword arguments, and
    the source (not in the cache key) with its hash (in it)."""
    params = builder_params(name, fn)

    def default(key: str, fallback: int) -> int:
        d = params[key].default if key in params else fallback
        return d if type(d) is int else fallback

    fields: list[tuple[str, type, Any]] = [
        ("input_size", int, opt(default("input_size", 28), ge=1)),
        ("num_classes", int, opt(default("num_classes", 10), ge=2)),
    ]
    for p in params.values():
        if p.name not in ("input_size", "num_classes", *RESERVED) and type(p.default) in SIMPLE:
            fields.append((p.name, type(p.default), dataclasses.field(default=p.default)))
    fields += [("source", str, opt(source, in_key=False)), ("source_sha256", str, opt(sha))]

    def validate(self: Any, where: str) -> None:
        if self.source_sha256 != sha:
            raise CapsbenchError(f"model {name}: {source} changed (sha256 {sha[:12]}, the run recorded "
                                 f"{self.source_sha256[:12]}); rerun to use the file as it is now")  # fmt: skip

    return dataclasses.make_dataclass("UserModelConfig", fields, frozen=True, namespace={"validate": validate})


def checked_builder(name: str, fn: Callable[..., Any]) -> Callable[[Any], BenchModel]:
    """The registry's builder: calls ``fn`` with the config's options it takes, then checks and
    adapts what it returns."""
    params = builder_params(name, fn)
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())

    def build(cfg: Any) -> BenchModel:
        options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESERVED}
        kwargs = {k: v for k, v in options.items() if takes_all or k in params}
        try:
            made = fn(**kwargs)
        except CapsbenchError:
            raise
        except Exception as e:
            raise CapsbenchError(f"model {name}: the builder raised {type(e).__name__}: {first_line(e)}") from None
        return adapt(name, made, cfg)

    return build


def adapt(name: str, made: Any, cfg: Any) -> BenchModel:
    """A BenchModel from what the builder returned: itself (checked), or a plain module wrapped."""
    if not isinstance(made, nn.Module):
        got = f"a value of type {type(made).__name__}"
        raise CapsbenchError(f"model {name}: the builder returned {got}, not an nn.Module; return the model")
    if not isinstance(made, BenchModel):
        check_scores(name, made, cfg, plain=True)
        return UserCNN(made, cfg.input_size, cfg.num_classes)
    missing = [a for a in CAPSULE_ATTRIBUTES if not hasattr(made, a)] if isinstance(made, CapsuleModel) else []
    if missing:
        raise CapsbenchError(f"model {name}: CapsuleModel {type(made).__name__} lacks {', '.join(missing)}; "
                             f"set them in __init__ (decoder = None for no decoder)")  # fmt: skip
    for key in ("input_size", "num_classes"):
        if not hasattr(made, key):
            setattr(made, key, getattr(cfg, key))
    check_scores(name, made, cfg, plain=False)
    return made


def check_scores(name: str, model: nn.Module, cfg: Any, plain: bool) -> None:
    """One forward of a (2, 1, S, S) batch of zeros, without gradients, in eval mode, on the
    model's device (the meta device at registration): scores must be (2, num_classes)."""
    p = next(model.parameters(), None)
    x = torch.zeros(2, 1, cfg.input_size, cfg.input_size, device=p.device if p is not None else None)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
    except Exception as e:
        what = f"{type(e).__name__}: {first_line(e)}"
        raise CapsbenchError(f"model {name}: forward of a {tuple(x.shape)} batch raised {what}") from None
    scores = out if plain else getattr(out, "scores", None)
    want = f"a (B, {cfg.num_classes}) tensor of {'logits' if plain else 'scores (ModelOutput.scores)'}"
    if not isinstance(scores, Tensor):
        raise CapsbenchError(f"model {name}: forward must return {want}, got a {type(scores).__name__}")
    if tuple(scores.shape) != (2, cfg.num_classes):
        raise CapsbenchError(f"model {name}: forward of a {tuple(x.shape)} batch returned shape {tuple(scores.shape)}; "
                             f"expected {want}, here (2, {cfg.num_classes})")  # fmt: skip


def probe_build(build: Callable[[Any], BenchModel], cfg: Any) -> None:
    """Build once with the defaults on the meta device (no memory, no weights) to refuse a broken
    model before any work; an op the meta device lacks is retried on the CPU."""
    try:
        with torch.device("meta"):
            build(cfg)
    except CapsbenchError as e:
        if "meta" not in str(e).lower():
            raise
        build(cfg)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
