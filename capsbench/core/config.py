"""Typed configuration: dataclass defaults, then a TOML table, then ``--set key=value``.

Declarative: a field's type says what it takes (``Literal[...]`` for a fixed vocabulary) and
``opt(...)`` metadata says its bounds, so every rule is checked once, in ``from_dict``, where a
dict becomes a dataclass; a class's own ``validate(where)`` keeps only rules that relate several
fields. Unknown keys, wrong types, values outside the vocabulary or the bounds are refused with
the key's name and what is allowed. ``in_key=False`` marks fields that do not change what a
training run computes (logging cadence, speed options), which ``weight_fields`` leaves out of
the weight cache key; ``keyed="unless-default"`` marks fields added after cache keys existed,
which enter the key only when set to something else than their default (older keys stay valid).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from typing import Any, Literal, TypeVar

import tomli_w

from capsbench.core.errors import CapsbenchError

C = TypeVar("C")

# The one precision vocabulary (training, evaluation, attacks, throughput): auto = bf16 autocast
# on CUDA; on a CPU, bf16 for training where the CPU multiplies bf16 natively and fp32 otherwise
# and for evaluation (core/device.py: amp_dtype). "off" is accepted as an older spelling of "fp32".
Precision = Literal["auto", "fp32", "bf16"]
PRECISION_ALIASES = {"off": "fp32"}
# When a field enters the weight cache key: always, or only when it differs from its default.
Keyed = Literal["always", "unless-default"]


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, ge: float | None = None,
        gt: float | None = None, le: float | None = None, lt: float | None = None, finite: bool = False,
        nonempty: bool = False, in_key: bool = True, keyed: Keyed = "always",
        aliases: dict[str, str] | None = None) -> Any:  # fmt: skip
    """A dataclass field with bounds (each element's, for a list), ``finite`` numbers,
    ``nonempty`` lists, aliases for old spellings, ``in_key`` (False: not part of the weight
    cache key) and ``keyed`` ("unless-default": in the key only when not the default)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "finite": finite, "nonempty": nonempty, "in_key": in_key,
            "keyed": keyed, "aliases": aliases or {}}  # fmt: skip
    return dataclasses.field(default=default, default_factory=factory, metadata={"capsbench": meta})


def _meta(f: dataclasses.Field) -> dict[str, Any]:
    return f.metadata.get("capsbench", {})


def _bound_error(value: Any, m: dict[str, Any]) -> str:
    """What bound ``value`` breaks ("" if none); NaN breaks every bound."""
    if m.get("finite") and not (isinstance(value, (int, float)) and math.isfinite(value)):
        return "a finite number"
    for name, sign, ok in (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)):  # fmt: skip
        b = m.get(name)
        if b is not None and not (isinstance(value, (int, float)) and not math.isnan(value) and ok(value, b)):
            return f"{sign} {b:g}"
    return ""


def check_fields(obj: Any, where: str = "") -> None:
    """Check every ``opt`` bound of the dataclass ``obj`` (each element of a list field)."""
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        m, value = _meta(f), getattr(obj, f.name)
        if not m:
            continue
        many = isinstance(value, (list, tuple))
        if many and m["nonempty"] and not value:
            raise CapsbenchError(f"{prefix}{f.name} needs at least one value")
        for v in value if many else [value]:
            broken = _bound_error(v, m)
            if broken:
                what = f"{prefix}{f.name} values" if many else f"{prefix}{f.name}"
                raise CapsbenchError(f"{what} must be {broken}, got {value!r}")


def weight_fields(obj: Any) -> dict[str, Any]:
    """The dataclass ``obj`` as a dict without its ``in_key=False`` fields, nor its
    ``keyed="unless-default"`` fields that hold their default."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if _in_key(f, getattr(obj, f.name))}


def _in_key(f: dataclasses.Field, value: Any) -> bool:
    m = _meta(f)
    if not m.get("in_key", True):
        return False
    if m.get("keyed", "always") == "unless-default":
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        return value != default
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{getattr(origin, '__name__', str(origin))}[{args}]"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, tuple, list, Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):  # type: True == 1 must not pass
            return value
        raise CapsbenchError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except CapsbenchError:
                continue
        raise CapsbenchError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise CapsbenchError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise CapsbenchError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, key)
    raise CapsbenchError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[C], values: dict[str, Any], where: str = "", base: C | None = None) -> C:
    """Build ``cls`` from ``values`` over ``base`` (or the defaults), refusing unknown keys."""
    types = field_types(cls)
    prefix = f"{where}." if where else ""
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise CapsbenchError(
            f"unknown key {prefix}{unknown[0]}; allowed keys{' in ' + where if where else ''}: {', '.join(types)}"
        )
    aliases = {f.name: _meta(f).get("aliases", {}) for f in dataclasses.fields(cls)}
    values = {k: aliases[k].get(v, v) if isinstance(v, str) else v for k, v in values.items()}
    checked = {k: coerce(v, types[k], prefix + k) for k, v in values.items()}
    obj = dataclasses.replace(base, **checked) if base is not None else cls(**checked)  # type: ignore[type-var]
    check(obj, where)
    return obj


def check(obj: Any, where: str = "") -> None:
    """Every rule of a config object: its fields' vocabulary-free bounds (``opt``), then its own
    cross-field ``validate(where)`` if it has one (``from_dict`` calls this)."""
    check_fields(obj, where)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)


def parse_value(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CapsbenchError(f"--set {item!r}: expected key=value, e.g. --set affine.copies=4")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CapsbenchError(f"--set {item!r}: {p} is set both as a value and as a table")
        node[parts[-1]] = parse_value(text.strip())
    return out


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_toml(data: dict[str, Any]) -> str:
    """``data`` (nested dicts of scalars and lists) as TOML, by tomli-w. TOML has no null, so a
    None anywhere is refused with its key rather than written as something else."""

    def refuse_none(d: Any, path: str) -> None:
        if d is None:
            raise ValueError(f"cannot write {path or 'the value'} = None to TOML (TOML has no null)")
        if isinstance(d, dict):
            for k, v in d.items():
                refuse_none(v, f"{path}.{k}" if path else str(k))
        elif isinstance(d, (list, tuple)):
            for i, v in enumerate(d):
                refuse_none(v, f"{path}[{i}]")

    refuse_none(data, "")
    return tomli_w.dumps(data)
