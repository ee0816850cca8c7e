"""Claim preconditions: what a claim's measurement needs to be meaningful, as data (``requires``
in claims.toml), checked from the run's own tables. A claim whose precondition fails is
``inconclusive`` whatever its interval says, and the claims table names the precondition.

A precondition is an inline table ``{ key = KIND, table = TABLE, ...parameters }``:

- ``accuracy`` (``at_least``, a fraction): every compared model's test accuracy >= at_least;
- ``converged``: every compared model met the convergence rule (train/convergence.py);
- ``protocol`` (``augment``, and optionally ``input_size``): the models were trained under it,
  e.g. the affNIST protocol: ``augment = "canvas"``, ``input_size = 40``;
- ``images`` (``at_least``, a count): every compared model saw at least that many training
  images (steps x batch_size), for parts that train their own models (MultiMNIST).
- ``dataset`` (``name``, a registered dataset): every compared model was trained and tested on it,
  so a claim about MNIST is never judged on a Fashion-MNIST run (rows from before the column: MNIST).
- ``iterations`` (``present``, a list of counts): every compared model has a row for each of these
  routing-iteration counts (column ``iters``) in every seed, for the routing-iterations ablation.

The rows read are the claim's own (``claim`` column = its id) where the table has a claim column
(table1), else those of the claim's model and the model it is compared with (tables/models.csv).
Unknown kinds, parameters or tables, and tables without the columns a kind reads, are refused
when claims.toml loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from capsbench.core.errors import CapsbenchError


@dataclass(frozen=True)
class Kind:
    """A precondition kind: its parameters (name -> type; required unless in ``optional``), the
    columns it reads (a tuple = any one of them), and its test of one row."""

    params: dict[str, type | tuple[type, ...]]
    columns: tuple[tuple[str, ...], ...]
    test: Callable[[Any, dict[str, Any]], str] | None  # (row, params) -> "" if it holds, else why not
    describe: Callable[[dict[str, Any]], str]
    optional: tuple[str, ...] = ()
    # A test of the rows together instead (what is absent, not what a row says): (rows, params) -> why not each
    rows_test: Callable[[pd.DataFrame, dict[str, Any]], list[str]] | None = None


def _accuracy(row: Any, p: dict[str, Any]) -> str:
    acc = float(getattr(row, "test_accuracy", getattr(row, "accuracy", float("nan"))))
    return "" if acc >= p["at_least"] else f"{100 * acc:.2f}% < {100 * p['at_least']:g}%"


def _converged(row: Any, p: dict[str, Any]) -> str:
    return "" if row.converged is True or row.converged == 1 else f"not converged ({row.convergence})"


def _images(row: Any, p: dict[str, Any]) -> str:
    seen = int(row.steps) * int(row.batch_size)
    return "" if seen >= p["at_least"] else f"saw {seen:,} training images"


def _protocol(row: Any, p: dict[str, Any]) -> str:
    wrong = row.augment != p["augment"] or ("input_size" in p and int(row.input_size) != p["input_size"])
    return f"trained with augment={row.augment} at {int(row.input_size)}x{int(row.input_size)}" if wrong else ""


def _dataset(row: Any, p: dict[str, Any]) -> str:
    used = getattr(row, "dataset", "mnist")  # tables written before the column were all MNIST
    return "" if used == p["name"] else f"trained on {used}"


def _iterations(rows: pd.DataFrame, p: dict[str, Any]) -> list[str]:
    """Each (model, seed) of ``rows`` lacking one of the iteration counts ``present``."""
    fails = []
    rows = rows if "seed" in rows.columns else rows.assign(seed=0)
    for (model, seed), g in rows.groupby(["model", "seed"], sort=False):
        missing = [k for k in p["present"] if k not in set(g.iters)]
        if missing:
            fails.append(f"{model} seed {seed} lacks {', '.join(map(str, missing))} routing iterations")
    return fails


def _iterations_text(p: dict[str, Any]) -> str:
    return f"routing iterations {', '.join(map(str, p['present']))} measured"


def _protocol_text(p: dict[str, Any]) -> str:
    size = f" at {p['input_size']}x{p['input_size']}" if "input_size" in p else ""
    return f"trained with augment={p['augment']}{size}"


AUGMENTS = ("shift", "canvas", "none")  # TrainConfig.augment's values
KINDS: dict[str, Kind] = {
    "accuracy": Kind({"at_least": (float, int)}, (("test_accuracy", "accuracy"),), _accuracy,
                     lambda p: f"test accuracy >= {100 * p['at_least']:g}%"),
    "converged": Kind({}, (("converged",), ("convergence",)), _converged, lambda p: "converged"),
    "protocol": Kind({"augment": str, "input_size": int}, (("augment",), ("input_size",)), _protocol, _protocol_text,
                     optional=("input_size",)),
    "images": Kind({"at_least": int}, (("steps",), ("batch_size",)), _images,
                   lambda p: f"at least {p['at_least']:,} training images"),
    "dataset": Kind({"name": str}, (("dataset",),), _dataset, lambda p: f"trained on {p['name']}"),
    "iterations": Kind({"present": list}, (("iters",),), None, _iterations_text, rows_test=_iterations),
}  # fmt: skip


@dataclass(frozen=True)
class Precondition:
    kind: str
    table: str
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return KINDS[self.kind].describe(self.params)


def parse(cid: str, raw: Any, tables: dict[str, tuple[str, ...]]) -> tuple[Precondition, ...]:
    """A claim's ``requires`` list, checked against the kinds and the tables runs write."""
    where = f"claim {cid!r}: requires"
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise CapsbenchError(f"{where} must be a list of inline tables {{ key = ..., table = ... }}, got {raw!r}")
    return tuple(_parse_one(f"{where}[{i}]", r, tables) for i, r in enumerate(raw))


def _parse_one(where: str, r: dict[str, Any], tables: dict[str, tuple[str, ...]]) -> Precondition:
    kind, table = r.get("key"), r.get("table")
    if not isinstance(kind, str) or kind not in KINDS:
        raise CapsbenchError(f"{where}: unknown precondition key {kind!r}; known: {', '.join(KINDS)}")
    if not isinstance(table, str) or table not in tables:
        hint = "" if tables else " (tables are registered when capsbench.parts.load_parts() runs)"
        raise CapsbenchError(f"{where}: precondition {kind} reads table {table!r}, which no run writes; "
                             f"known tables: {', '.join(sorted(tables))}{hint}")  # fmt: skip
    k = KINDS[kind]
    lacking = [" or ".join(c) for c in (("model", "claim"), *k.columns) if not set(c) & set(tables[table])]
    if lacking:
        raise CapsbenchError(f"{where}: precondition {kind} reads column {lacking[0]}, which table {table} lacks")
    params = {p: v for p, v in r.items() if p not in ("key", "table")}
    for p, v in params.items():
        if p not in k.params:
            raise CapsbenchError(f"{where}: precondition {kind} has no parameter {p!r}; "
                                 f"its parameters: {', '.join(k.params) or 'none'}")  # fmt: skip
        tp = k.params[p]
        if tp is list:  # iterations.present: counts
            counts = isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in v)
            if not (counts and v):
                raise CapsbenchError(f"{where}: {kind}.{p} must be a non-empty list of integers >= 1, got {v!r}")
            continue
        fraction = tp == (float, int)
        if not isinstance(v, tp) or isinstance(v, bool) or (fraction and not 0 < v <= 1) or (tp is int and v < 0):
            want = "a fraction in (0, 1]" if fraction else "an integer >= 0" if tp is int else "a string"
            raise CapsbenchError(f"{where}: {kind}.{p} must be {want}, got {v!r}")
        if p == "augment" and v not in AUGMENTS:
            raise CapsbenchError(f"{where}: {kind}.augment must be one of {', '.join(AUGMENTS)}, got {v!r}")
        if kind == "dataset" and p == "name":
            from capsbench.data.datasets import DATASETS

            if v not in DATASETS:
                known = ", ".join(DATASETS.names())
                raise CapsbenchError(f"{where}: dataset.name must be a registered dataset ({known}), got {v!r}")
    missing = [p for p in k.params if p not in params and p not in k.optional]
    if missing:
        raise CapsbenchError(f"{where}: precondition {kind} needs {missing[0]!r}")
    return Precondition(kind, table, params)


def _rows(pre: Precondition, claim: Any, tables: dict[str, pd.DataFrame]) -> pd.DataFrame | None:
    df = tables.get(pre.table)
    if df is None or df.empty:
        return None
    if "claim" in df.columns:
        return df[df.claim == claim.id]
    return df[df.model.isin([claim.model] + ([claim.minus] if claim.minus else []))]


def check(pre: Precondition, claim: Any, tables: dict[str, pd.DataFrame]) -> str:
    """'' when the precondition holds on the run's tables, else one line saying why not (every
    compared model needs rows: one without any cannot show the precondition)."""
    rows = _rows(pre, claim, tables)
    if rows is None or rows.empty:
        return f"{pre.describe()}: no rows in tables/{pre.table}.csv to check it on"
    if "claim" not in rows.columns:
        absent = [m for m in [claim.model] + ([claim.minus] if claim.minus else []) if m not in set(rows.model)]
        if absent:
            return f"{pre.describe()}: no row for {absent[0]} in tables/{pre.table}.csv to check it on"
    kind = KINDS[pre.kind]
    fails = kind.rows_test(rows, pre.params) if kind.rows_test else []
    for r in rows.itertuples() if kind.test else ():
        why = kind.test(r, pre.params)
        if why:
            seed = f" seed {int(r.seed)}" if "seed" in rows.columns else ""
            fails.append(f"{r.model}{seed} {why}")
    return f"{pre.describe()}: " + "; ".join(fails) if fails else ""


def other_dataset(claim: Any, tables: dict[str, pd.DataFrame]) -> tuple[str, str] | None:
    """(the dataset a ``dataset`` precondition names, the other one the claim's rows were trained
    on), or None when none names another: the claim is then not judged on this run."""
    for pre in (p for p in claim.requires if p.kind == "dataset"):
        rows = _rows(pre, claim, tables)
        used = [] if rows is None else [getattr(r, "dataset", "mnist") for r in rows.itertuples()]
        other = [u for u in used if u != pre.params["name"]]
        if other:
            return pre.params["name"], other[0]
    return None


def evaluate(claim: Any, tables: dict[str, pd.DataFrame]) -> tuple[list[str], list[str]]:
    """(the preconditions of ``claim`` that held, in words; why each failing one failed)."""
    held, failed = [], []
    for pre in claim.requires:
        why = check(pre, claim, tables)
        failed.append(why) if why else held.append(pre.describe())
    return held, failed
