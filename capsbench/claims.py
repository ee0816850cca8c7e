"""The registry of paper claims (data in claims.toml) and the rule that turns a measurement into
a verdict. A claim is never ``reproduced`` without a measurement and its interval.

Rule: each claim has a band [lo, hi] of values consistent with it (the paper's value plus or
minus its tolerance, or an explicit band such as [0, inf) for "capsules are more robust").
Given the measured 95% interval [ci_low, ci_high]:

- ``reproduced``: the interval lies inside the band;
- ``not reproduced``: the interval and the band do not meet;
- ``inconclusive``: they overlap but the interval reaches outside the band (too wide to decide);
- ``not run``: no measurement.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from capsbench.errors import CapsbenchError

VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not run")
FIELDS = ("source", "statement", "paper_value", "unit", "metric", "protocol", "model", "options")


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

    @property
    def tolerance_rule(self) -> str:
        lo, hi = self.band
        if math.isinf(hi) and not math.isinf(lo):
            return f"95% interval entirely >= {lo:g}"
        if math.isinf(lo) and not math.isinf(hi):
            return f"95% interval entirely <= {hi:g}"
        return f"95% interval inside [{lo:g}, {hi:g}]"


def _claim(cid: str, raw: dict[str, Any]) -> Claim:
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        raise CapsbenchError(f"claim {cid!r} lacks {', '.join(missing)} (capsbench/claims.toml)")
    if "band" in raw:
        lo, hi = (float(v) for v in raw["band"])
    elif "tolerance" in raw and math.isfinite(float(raw["paper_value"])):
        lo, hi = float(raw["paper_value"]) - float(raw["tolerance"]), float(raw["paper_value"]) + float(raw["tolerance"])
    else:
        raise CapsbenchError(f"claim {cid!r} needs a band, or a finite paper_value with a tolerance")
    if not lo < hi:
        raise CapsbenchError(f"claim {cid!r}: band [{lo}, {hi}] is empty")
    return Claim(cid, raw["source"], raw["statement"], float(raw["paper_value"]), raw["unit"], raw["metric"],
                 raw["protocol"], raw["model"], (lo, hi), dict(raw["options"]))  # fmt: skip


def load_claims(text: str | None = None) -> dict[str, Claim]:
    """Every claim, by id, in file order (``text`` replaces claims.toml, for tests)."""
    if text is None:
        text = resources.files("capsbench").joinpath("claims.toml").read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # e.g. a claim id declared twice
        raise CapsbenchError(f"the claims registry is not valid TOML: {e}") from None
    return {cid: _claim(cid, r) for cid, r in raw.items()}


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
