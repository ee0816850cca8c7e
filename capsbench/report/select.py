"""Which rows of a run table belong to one model and setting: one rule for the report's headline
and the claims, so both read the same numbers."""

from __future__ import annotations

from typing import Any

import pandas as pd

TOLERANCE = 1e-9  # float columns (eps, value) match within this


def select_rows(df: pd.DataFrame, model: str, where: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows of ``model`` (white-box only, where the table has ``source_model``) matching
    ``where``, column -> value (floats within TOLERANCE) or a list of values, of which the first
    with rows is taken; and the value chosen for each column. No rows when a column is missing."""
    rows = df[df.model == model]
    if "source_model" in rows.columns:
        rows = rows[rows.source_model == model]  # white-box: the model attacked through itself
    chosen: dict[str, Any] = {}
    for col, want in where.items():
        if col not in rows.columns:
            return rows.iloc[:0], chosen
        for w in want if isinstance(want, list) else [want]:
            hit = rows[(rows[col] - w).abs() < TOLERANCE] if isinstance(w, float) else rows[rows[col] == w]
            if len(hit):
                rows, chosen[col] = hit, w
                break
        else:
            return rows.iloc[:0], chosen
    return rows, chosen
