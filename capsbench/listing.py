"""What `python -m capsbench list ...` prints."""

from __future__ import annotations

import math
from typing import Any, Callable

from capsbench.registry import Registry

LISTS: Registry[Callable[[], list[dict[str, Any]]]] = Registry("list")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table; the last column is left unpadded so long descriptions wrap naturally."""
    if not rows:
        return "(nothing)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals[:-1], widths)) + "  " + vals[-1]  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths]), *(fmt(r) for r in cells)])


@LISTS.register("models")
def list_models() -> list[dict[str, Any]]:
    from capsbench.models import MODELS, build_model

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
        rows.append({"preset": name, "steps": cfg.steps, "batch": cfg.batch_size, "description": raw.get("description", "")})
    return rows


@LISTS.register("suites")
def list_suites() -> list[dict[str, Any]]:
    from capsbench.runner import known_suites, read_suite

    rows = []
    for name, path in known_suites().items():
        raw = read_suite(path)
        rows.append({"suite": name, "parts": ", ".join(raw.get("parts", [])), "description": raw.get("description", "")})
    return rows


@LISTS.register("claims")
def list_claims() -> list[dict[str, Any]]:
    from capsbench.claims import load_claims

    rows = []
    for c in load_claims().values():
        value = "qualitative" if math.isnan(c.paper_value) else f"{c.paper_value:g} {c.unit}"
        rows.append({"claim": c.id, "paper value": value, "tolerance rule": c.tolerance_rule,
                     "source": c.source, "statement": c.statement})  # fmt: skip
    return rows
