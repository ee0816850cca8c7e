"""Typed configuration: dataclass defaults, then a TOML table, then ``--set key=value``.

Unknown keys and wrong types are refused with the key's name and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from typing import Any, TypeVar

from capsbench.core.errors import CapsbenchError

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = ", ".join(_type_name(a) for a in typing.get_args(tp))
    return f"{getattr(origin, '__name__', str(origin))}[{args}]"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, tuple, list, Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
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
    checked = {k: coerce(v, types[k], prefix + k) for k, v in values.items()}
    obj = dataclasses.replace(base, **checked) if base is not None else cls(**checked)  # type: ignore[type-var]
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


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
    """Write a nested dict of scalars/lists as TOML (enough for resolved configs)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if v is None:
            return '""'
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines: list[str] = []

    def table(d: dict[str, Any], path: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if path and scalars:
            lines.append(f"\n[{'.'.join(path)}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {val(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                table(v, path + [k])

    table(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"
