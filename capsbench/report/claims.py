"""The registry of paper claims (data in claims.toml) and the rule that turns a measurement into
a verdict. A claim is never ``reproduced`` without a measurement and its interval.

Rule: each claim has a band [lo, hi] of values consistent with it (the paper's value plus or
minus its tolerance, or an explicit band such as [0, inf) for "capsules are more robust").
Given the measured 95% interval [ci_low, ci_high]:

- ``reproduced``: the interval lies inside the band;
- ``not reproduced``: the interval and the band do not meet;
- ``inconclusive``: they overlap but the interval reaches outside the band (too wide to decide);
- ``not run``: no measurement.

A claim's preconditions (``requires``, report/preconditions.py) and sanity checks (``checks``)
must hold on the run's tables for any verdict but ``inconclusive``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pandas as pd

from capsbench.core.errors import CapsbenchError
from capsbench.report import preconditions
from capsbench.report.preconditions import Precondition
from capsbench.report.select import select_rows
from capsbench.report.stats import newcombe_interval, ratio_interval, seed_summary, wilson_interval
from capsbench.report.tables import known_tables

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")
FIELDS = ("source", "statement", "paper_value", "unit", "metric", "protocol", "model", "options", "part", "table",
          "value", "where")
# detection: detected / fooled (detection tables); error_reduction: 100 x (1 - error / error of `minus`),
# the relative reduction of errors against the compared model on the same images (a `minus` claim)
VALUES = ("accuracy", "error", "params", "detection", "error_reduction")
# Sanity-check keys a claim may list (``checks``): a failed one, for the claim's model or the
# model it is compared with, makes the verdict inconclusive. Written by the parts into
# tables/<claim part>_checks.csv.
CHECK_KEYS = ("eps0", "monotone", "iterative", "near-zero", "transfer", "square", "convergence", "restarts", "worst",
              "detector", "familiar-azimuth", "familiar-elevation")


@dataclass(frozen=True)
class Claim:
    id: str
    source: str
    statement: str
    paper_value: float  # nan for a qualitative claim
    unit: str
    metric: str
    protocol: str
    model: str
    band: tuple[float, float]
    options: dict[str, Any] = field(default_factory=dict)
    part: str = ""  # the suite part whose table measures it
    table: str = ""  # the run table (tables/<table>.csv)
    value: str = "accuracy"  # accuracy, error or params, read for `model`
    where: dict[str, Any] = field(default_factory=dict)  # row filter; a list = first value with rows
    minus: str = ""  # a second model to subtract (a difference claim), on the same images
    train: dict[str, Any] = field(default_factory=dict)  # training-config overrides of this claim's model
    checks: tuple[str, ...] = ()  # sanity-check keys (CHECK_KEYS) that must pass for a verdict
    requires: tuple[Precondition, ...] = ()  # what the measurement needs to be meaningful (preconditions.py)
    # A difference against the best of several rows: column -> values; per seed the best (lowest
    # error, highest accuracy) of the rows of `minus` (or of `model` itself) at those values.
    best_of: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def compares(self) -> bool:
        """Whether the claim is a difference (against `minus` or the best of `best_of`'s rows)."""
        return bool(self.minus or self.best_of)

    @property
    def tolerance_rule(self) -> str:
        lo, hi = self.band
        if math.isinf(hi) and not math.isinf(lo):
            return f"95% interval entirely >= {lo:g}"
        if math.isinf(lo) and not math.isinf(hi):
            return f"95% interval entirely <= {hi:g}"
        return f"95% interval inside [{lo:g}, {hi:g}]"


def _claim(cid: str, raw: dict[str, Any], tables: dict[str, tuple[str, ...]]) -> Claim:
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise CapsbenchError(f"claim {cid!r} lacks {', '.join(missing)} (capsbench/report/claims.toml)")
    if "band" in raw:
        lo, hi = (float(v) for v in raw["band"])
    elif "tolerance" in raw and math.isfinite(float(raw["paper_value"])):
        lo, hi = float(raw["paper_value"]) - float(raw["tolerance"]), float(raw["paper_value"]) + float(raw["tolerance"])
    else:
        raise CapsbenchError(f"claim {cid!r} needs a band, or a finite paper_value with a tolerance")
    if not lo < hi:
        raise CapsbenchError(f"claim {cid!r}: band [{lo}, {hi}] is empty")
    if raw["value"] not in VALUES:
        raise CapsbenchError(f"claim {cid!r}: value must be one of {', '.join(VALUES)}, got {raw['value']!r}")
    if raw["value"] == "error_reduction" and not raw.get("minus"):
        raise CapsbenchError(f"claim {cid!r}: value error_reduction needs `minus`, the model whose errors it reduces")
    checks = raw.get("checks", [])
    bad = [c for c in checks if c not in CHECK_KEYS] if isinstance(checks, list) else [checks]
    if bad:
        raise CapsbenchError(f"claim {cid!r}: unknown check {bad[0]!r}; known checks: {', '.join(CHECK_KEYS)}")
    requires = preconditions.parse(cid, raw["requires"], tables) if "requires" in raw else ()
    best_of = raw.get("best_of", {})
    lists = isinstance(best_of, dict) and all(isinstance(v, list) and v for v in best_of.values())
    if not (lists and len(best_of) <= 1):
        raise CapsbenchError(f"claim {cid!r}: best_of must be one column = a non-empty list of values, got {best_of!r}")
    return Claim(cid, raw["source"], raw["statement"], float(raw["paper_value"]), raw["unit"], raw["metric"],
                 raw["protocol"], raw["model"], (lo, hi), dict(raw["options"]), raw["part"], raw["table"],
                 raw["value"], dict(raw["where"]), raw.get("minus", ""), dict(raw.get("train", {})),
                 tuple(checks), requires, dict(best_of))  # fmt: skip


def load_claims(text: str | None = None) -> dict[str, Claim]:
    """Every claim, by id, in file order (``text`` replaces claims.toml, for tests)."""
    if text is None:
        text = resources.files("capsbench.report").joinpath("claims.toml").read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # e.g. a claim id declared twice
        raise CapsbenchError(f"the claims registry is not valid TOML: {e}") from None
    tables = known_tables()
    return {cid: _claim(cid, r, tables) for cid, r in raw.items()}


def select(ids: str | None, claims: dict[str, Claim] | None = None) -> list[Claim]:
    """The claims named in a comma-separated ``--claims`` value (all when None or empty)."""
    claims = load_claims() if claims is None else claims
    if not ids:
        return list(claims.values())
    wanted = [i.strip() for i in ids.split(",") if i.strip()]
    unknown = [i for i in wanted if i not in claims]
    if unknown:
        raise CapsbenchError(f"unknown claim {unknown[0]!r}; known claims: {', '.join(claims)} (see `list claims`)")
    return [claims[i] for i in dict.fromkeys(wanted)]


def verdict(claim: Claim, ci_low: float | None, ci_high: float | None) -> str:
    """The claim's verdict for a measured 95% interval (None or NaN: not run)."""
    if ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
        return "not run"
    if ci_low > ci_high:
        raise ValueError(f"interval [{ci_low}, {ci_high}] is reversed")
    lo, hi = claim.band
    if lo <= ci_low and ci_high <= hi:
        return "reproduced"
    if ci_high < lo or ci_low > hi:
        return "not reproduced"
    return "inconclusive"


# --- measuring a claim from a run's tables ------------------------------------------------------


def _proportions(claim: Claim, rows: pd.DataFrame) -> dict[int, tuple[float, int]]:
    """seed -> (count, n) of the claim's proportion (correct, or wrong for an error claim)."""
    out = {}
    for r in rows.itertuples():
        n = int(r.n)
        if claim.value == "detection":
            k, n = r.detected, int(r.fooled)
        elif claim.value in ("error", "error_reduction"):
            k = r.error * n if "error" in rows.columns else n - r.accuracy * n
        else:
            k = r.correct if "correct" in rows.columns else r.accuracy * n
        out[int(getattr(r, "seed", 0))] = (float(k), n)
    return out


def _value(claim: Claim, a: tuple[float, int], b: tuple[float, int] | None) -> float:
    """One seed's value in the claim's unit: 100 x the proportion, minus the compared model's, or
    for error_reduction 100 x (1 - the error ratio) (NaN when the compared model made no error)."""
    pa = a[0] / a[1]
    if b is None:
        return 100 * pa
    pb = b[0] / b[1]
    if claim.value == "error_reduction":
        return 100 * (1 - pa / pb) if pb > 0 else math.nan
    return 100 * (pa - pb)


def _compared(claim: Claim, df: pd.DataFrame, chosen: dict[str, Any]) -> tuple[dict[int, tuple[float, int]], str]:
    """seed -> (count, n) of what the claim's model is compared with: `minus` on the same rows, or
    per seed the best of `best_of`'s rows (lowest error, highest accuracy); and a note saying which."""
    if not claim.best_of:
        return _proportions(claim, select_rows(df, claim.minus, chosen)[0]), ""
    ((col, values),) = claim.best_of.items()
    lower = claim.value in ("error", "error_reduction")  # a count of errors: fewer is better
    best: dict[int, tuple[float, int]] = {}
    picked: dict[int, Any] = {}
    for v in values:
        rows = select_rows(df, claim.minus or claim.model, {**chosen, col: v})[0]
        for seed, (k, n) in _proportions(claim, rows).items():
            p, held = k / n, best.get(seed)
            if held is None or (p < held[0] / held[1] if lower else p > held[0] / held[1]):  # ties: the first listed
                best[seed], picked[seed] = (k, n), v
    note = ", ".join(f"seed {s}: {col} = {v}" for s, v in sorted(picked.items()))
    return best, f"against the best of {col} = {', '.join(map(str, values))} ({note})" if picked else ""


def measure(claim: Claim, tables: dict[str, pd.DataFrame]) -> dict[str, Any] | None:
    """Mean and 95% interval of the claim's quantity (in its unit) from a run's tables; None when
    the run has no such measurement. One seed: Wilson (or Newcombe for a difference) over the n
    images; several: a t-interval over the per-seed values."""
    df = tables.get(claim.table)
    if df is None or df.empty or "model" not in df.columns:
        return None
    rows, chosen = select_rows(df, claim.model, claim.where)
    if rows.empty:
        return None
    if claim.value == "params":
        v = float(rows.params.iloc[0]) / 1e6
        return {"mean": v, "ci_low": v, "ci_high": v, "n_seeds": 1, "chosen": chosen, "method": "exact count"}
    failed = sorted({int(getattr(r, "seed", 0)) for r in rows.itertuples() if getattr(r, "train_failed", False)})
    a = _proportions(claim, rows)
    b, against = _compared(claim, df, chosen) if claim.compares else ({}, "")
    seeds = sorted(set(a) & set(b)) if claim.compares else sorted(a)
    if not seeds:
        return None
    vals = [_value(claim, a[s], b.get(s)) for s in seeds]
    against = f", {against}" if against else ""
    if len(seeds) > 1:
        st = seed_summary(vals)
        method = f"t-interval over {len(seeds)} seeds{against}"
        return {"mean": st["mean"], "ci_low": st["ci_low"], "ci_high": st["ci_high"], "n_seeds": len(seeds),
                "chosen": chosen, "method": method, "failed": failed}  # fmt: skip
    (k1, n1) = a[seeds[0]]
    if claim.value == "error_reduction":
        lo_r, hi_r = ratio_interval(k1, n1, *b[seeds[0]])
        lo, hi = (1 - hi_r, 1 - lo_r)
        method = f"Katz log interval of the error ratio, n={n1} images, 1 seed"
    elif claim.compares:
        lo, hi = newcombe_interval(k1, n1, *b[seeds[0]])
        method = f"Newcombe interval, n={n1} images, 1 seed"
    else:
        lo, hi = wilson_interval(k1, n1)
        method = f"Wilson interval, n={n1} images, 1 seed"
    return {"mean": vals[0], "ci_low": 100 * lo, "ci_high": 100 * hi, "n_seeds": 1, "chosen": chosen,
            "method": method + against, "failed": failed}


def claim_row(claim: Claim, tables: dict[str, pd.DataFrame], preset: str, paper_protocol: bool = False) -> dict[str, Any]:
    """One line of claims.csv: the measurement, its interval, the verdict and notes (a preset
    that is not the paper's protocol noted as reduced)."""
    m = measure(claim, tables)
    row = {"claim": claim.id, "paper_value": claim.paper_value, "unit": claim.unit,
           "band": f"[{claim.band[0]:g}, {claim.band[1]:g}]"}  # fmt: skip
    if m is None:
        return not_run_row(claim, not_measured(claim, tables))
    notes = [m["method"]]
    off = preconditions.other_dataset(claim, tables)
    if off:  # a claim about another dataset's numbers says nothing about this run's
        notes.insert(0, f"not judged: the claim is about {off[0]}, and this run trained on {off[1]} "
                        "(dataset precondition)")  # fmt: skip
    if m["chosen"].get("transform") == "composite":
        notes.append("affNIST-style composite set, not affNIST (set affine.affnist_path for the real test set)")
    if not (preset == "full" or paper_protocol) and claim.value != "params":
        notes.append(f"reduced protocol (preset {preset}), not the paper's: the verdict is about this protocol only")
    decided = verdict(claim, m["ci_low"], m["ci_high"])
    if m.get("failed"):  # a model that did not learn cannot speak for or against the claim
        decided = "inconclusive"
        notes.append(f"training failed (accuracy at chance) for seed(s) {', '.join(map(str, m['failed']))}")
    held, precondition = preconditions_line(claim, tables)
    if not held:
        decided = "inconclusive"
    return {**row, "measured_mean": round(m["mean"], 6), "ci_low": round(m["ci_low"], 6), "ci_high": round(m["ci_high"], 6),
            "n_seeds": m["n_seeds"], "verdict": decided, "precondition": precondition, "notes": "; ".join(notes)}  # fmt: skip


def not_measured(claim: Claim, tables: dict[str, pd.DataFrame]) -> str:
    """Why a run has no measurement for ``claim``: its part did not run, or a model it compares
    is not among the run's models, named with how to add it."""
    df = tables.get(claim.table)
    if df is None or df.empty or "model" not in df.columns:
        return f"no {claim.table} measurement in this run (part {claim.part})"
    absent = [m for m in (claim.model, claim.minus) if m and m not in set(df.model)]
    if absent:
        return (f"{' and '.join(absent)} not in this run's {claim.table} table (part {claim.part}): "
                f"add {'them' if len(absent) > 1 else 'it'} with --models")  # fmt: skip
    return f"no {claim.table} row for the claim's measure in this run (part {claim.part})"


def not_run_row(claim: Claim, why: str) -> dict[str, Any]:
    """A claims.csv line with no measurement: every column, verdict ``not run``, ``why`` as the note."""
    return {"claim": claim.id, "paper_value": claim.paper_value, "unit": claim.unit,
            "band": f"[{claim.band[0]:g}, {claim.band[1]:g}]", "measured_mean": math.nan, "ci_low": math.nan,
            "ci_high": math.nan, "n_seeds": 0, "verdict": "not run", "precondition": "", "notes": why}  # fmt: skip


def preconditions_line(claim: Claim, tables: dict[str, pd.DataFrame]) -> tuple[bool, str]:
    """(whether the claim's preconditions and sanity checks hold, the claims table's line)."""
    held, failed = preconditions.evaluate(claim, tables)
    if claim.checks:
        bad = gate_checks(claim, tables)
        if bad:
            failed.append(f"sanity check failed: {bad}")
        else:
            held.append(f"sanity checks passed ({', '.join(claim.checks)})")
    if failed:
        return False, "FAILED: " + "; ".join(failed)
    return True, "held: " + ", ".join(held) if held else "none"


def gate_checks(claim: Claim, tables: dict[str, pd.DataFrame]) -> str:
    """The claim's failed sanity checks, for its model and the one it is compared with, as one
    line ('' when all passed); a run that recorded none fails them all."""
    if not claim.checks:
        return ""
    df = tables.get(f"{claim.part}_checks")
    if df is None or df.empty:
        return f"none recorded (tables/{claim.part}_checks.csv), needed: {', '.join(claim.checks)}"
    models = {claim.model} | ({claim.minus} if claim.minus else set())
    bad = df[df.model.isin(models) & df.check.isin(claim.checks) & ~df.passed.astype(bool)]
    names = list(dict.fromkeys(bad.name))
    return "; ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
