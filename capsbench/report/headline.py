"""Headline numbers: the few numbers per model that a part puts in the report's headline table,
the summary's headline and the MLflow metrics. A part declares them once, where it registers
(``@part(..., headline=[...])``); the report, the summary and the tracker iterate over the
parts a run ran (``HEADLINES``, filled when ``capsbench.parts`` loads) instead of naming them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import pandas as pd

from capsbench.core.registry import Registry
from capsbench.report.format import accuracy_cell
from capsbench.report.select import select_rows

Tables = Mapping[str, pd.DataFrame]


@dataclass(frozen=True)
class Headline:
    """One number per model, read from a run table: an accuracy (the rows ``where`` selects, one
    per seed: the cell has its interval, the metric is the mean over seeds) or a speed (the best
    images/s over the rows of ``where``: the cell names its setting)."""

    label: str  # the headline table's column, e.g. "composite %"
    metric: str  # the MLflow metric, before "/<model>", e.g. "composite_accuracy"
    table: str  # the run table it reads (tables/<table>.csv)
    where: Mapping[str, Any] = field(default_factory=dict)  # select_rows' filter: column -> value(s)
    kind: Literal["accuracy", "speed"] = "accuracy"
    optional: tuple[str, ...] = ()  # filter columns dropped where a table lacks them (older run folders)
    about: str = ""  # what it measures, for the report's note under the headline table

    def filter(self, df: pd.DataFrame) -> dict[str, Any]:
        return {k: v for k, v in self.where.items() if k in df.columns or k not in self.optional}

    def cell(self, tables: Tables, model: str) -> str:
        """The table cell: '98.1 [97.1, 98.8] (n=1000, 1 seed, Wilson)', '1,234 (batch 64, fp32, ...)' or '–'."""
        if self.kind == "speed":
            return speed_cell(self.best(tables, model))
        return accuracy_cell(self.per_seed(tables, model))

    def value(self, tables: Tables, model: str) -> float | None:
        """The metric: the mean accuracy over seeds (a fraction), or the best images/s; None without rows."""
        if self.kind == "speed":
            best = self.best(tables, model)
            return None if best is None else float(best["samples_per_sec"])
        values = self.per_seed(tables, model)
        return sum(a for a, _ in values) / len(values) if values else None

    def per_seed(self, tables: Tables, model: str) -> list[tuple[float, int]]:
        df = tables.get(self.table)
        return [] if df is None else per_seed(df, model, **self.filter(df))

    def best(self, tables: Tables, model: str) -> pd.Series | None:
        df = tables.get(self.table)
        return None if df is None else best_row(df, model, self.filter(df))


HEADLINES: Registry[tuple[Headline, ...]] = Registry("headline")  # part name -> its headline numbers


def part_headlines(parts: list[str]) -> list[Headline]:
    """The headline numbers of ``parts`` (a run's config), in the run's part order."""
    return [h for p in parts if p in HEADLINES for h in HEADLINES.get(p)]


def per_seed(df: pd.DataFrame | None, model: str, **where: Any) -> list[tuple[float, int]]:
    """(accuracy, n) of each of ``model``'s rows matching ``where`` (white-box rows of an attack table)."""
    if df is None or df.empty:
        return []
    rows, _ = select_rows(df, model, where)
    return [(float(r.accuracy), int(r.n)) for r in rows.itertuples()]


def best_row(df: pd.DataFrame | None, model: str, where: Mapping[str, Any]) -> pd.Series | None:
    """The row of ``model``'s best images/s among those matching ``where``, or None."""
    if df is None or df.empty:
        return None
    rows, _ = select_rows(df, model, dict(where))
    return None if rows.empty else rows.loc[rows.samples_per_sec.idxmax()]


def speed_cell(best: pd.Series | None) -> str:
    """'1,234 (batch 64, fp32, compiled default, channels_last, median of 5)' or '–'."""
    if best is None:
        return "–"
    how = [f"batch {int(best['batch_size'])}", str(best["dtype"])]
    flag = lambda key: pd.notna(best.get(key)) and bool(best.get(key))  # noqa: E731 - a column older runs lack
    if flag("compile"):
        mode = best.get("compile_mode")
        how.append(f"compiled {mode}" if isinstance(mode, str) and mode else "compiled")
    if flag("channels_last"):
        how.append("channels_last")
    return f"{best['samples_per_sec']:,.0f} ({', '.join(how)}, median of {int(best['repeats'])})"


CLEAN = Headline("clean %", "clean_accuracy", "clean")  # the runner's own: clean accuracy on the run's test images


def headline_row(tables: Tables, model: str, parts: list[str]) -> dict[str, str]:
    """``model``'s cells: clean accuracy, then every headline number of ``parts``."""
    return {h.label: h.cell(tables, model) for h in [CLEAN, *part_headlines(parts)]}


def headline_notes(parts: list[str]) -> str:
    """What each of ``parts``' headline numbers measures, one sentence per distinct note."""
    return " ".join(dict.fromkeys(h.about for h in part_headlines(parts) if h.about))


def headline_metrics(tables: Tables, model: str, parts: list[str]) -> dict[str, float | None]:
    """``model``'s metrics (``<metric>/<model>``) for the same numbers as ``headline_row``."""
    return {f"{h.metric}/{model}": h.value(tables, model) for h in [CLEAN, *part_headlines(parts)]}
