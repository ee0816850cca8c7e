"""Claims registry, verdict rule and seed statistics (issue 4's foundations)."""

from __future__ import annotations

import math

import pytest

from capsbench.claims import VERDICTS, load_claims, select, verdict
from capsbench.cli import main
from capsbench.errors import CapsbenchError
from capsbench.models import build_model
from capsbench.stats import seed_summary, t_quantile_975

REQUIRED = {
    "mnist-error-baseline", "mnist-error-r1-norecon", "mnist-error-r1-recon", "mnist-error-r3-norecon",
    "mnist-error-r3-recon", "params-capsnet", "params-capsnet-nodecoder", "params-baseline", "affnist-capsnet",
    "affnist-gap", "multimnist-error", "adversarial-fgsm", "adversarial-bim",
}  # fmt: skip


def test_registry_is_complete_and_every_entry_is_filled():
    claims = load_claims()
    assert REQUIRED <= set(claims)
    for c in claims.values():
        assert c.source and c.statement and c.unit and c.metric and c.protocol, c.id
        lo, hi = c.band
        assert lo < hi
        if not math.isnan(c.paper_value):
            assert lo <= c.paper_value <= hi, f"{c.id}: the paper's own value must satisfy its claim"


def test_table1_values_match_the_facts_file():
    claims = load_claims()
    values = {k: claims[k].paper_value for k in REQUIRED if k.startswith("mnist-error")}
    assert values == {"mnist-error-baseline": 0.39, "mnist-error-r1-norecon": 0.34, "mnist-error-r1-recon": 0.29,
                      "mnist-error-r3-norecon": 0.35, "mnist-error-r3-recon": 0.25}  # fmt: skip


def test_duplicate_or_incomplete_claims_are_refused():
    with pytest.raises(CapsbenchError, match="declare.*twice"):  # ids are unique
        load_claims('[a]\nsource="s"\n[a]\nsource="t"\n')
    with pytest.raises(CapsbenchError, match="lacks"):
        load_claims('[a]\nsource = "s"\n')
    with pytest.raises(CapsbenchError, match="needs a band"):
        load_claims('[a]\nsource="s"\nstatement="x"\npaper_value=nan\nunit="u"\nmetric="m"\nprotocol="p"\n'
                    'model="capsnet"\noptions={}\n')  # fmt: skip


@pytest.mark.parametrize(
    "interval,expected",
    [
        ((0.24, 0.27), "reproduced"),  # inside [0.19, 0.31]
        ((0.45, 0.60), "not reproduced"),  # entirely above
        ((0.05, 0.15), "not reproduced"),  # entirely below
        ((0.20, 0.45), "inconclusive"),  # overlaps, too wide
        ((0.10, 0.60), "inconclusive"),  # contains the band: too wide to decide
        ((None, None), "not run"),
        ((math.nan, math.nan), "not run"),
    ],
)
def test_verdict_rule_on_synthetic_intervals(interval, expected):
    claim = load_claims()["mnist-error-r3-recon"]  # 0.25% +- 0.06
    assert verdict(claim, *interval) == expected
    assert expected in VERDICTS


def test_one_sided_claims():
    claim = load_claims()["adversarial-fgsm"]  # capsnet - cnn >= 0
    assert verdict(claim, 2.0, 9.0) == "reproduced"
    assert verdict(claim, -9.0, -2.0) == "not reproduced"
    assert verdict(claim, -3.0, 4.0) == "inconclusive"
    with pytest.raises(ValueError, match="reversed"):
        verdict(claim, 4.0, -3.0)


def test_parameter_claims_hold_for_the_models():
    """The exact counts of the registered models satisfy the paper's rounded parameter claims."""
    claims = load_claims()
    for cid in ("params-capsnet", "params-capsnet-nodecoder", "params-baseline"):
        c = claims[cid]
        p = build_model(c.model, **c.options).num_params() / 1e6
        assert verdict(c, p, p) == "reproduced", (cid, p)


def test_select_subset_and_unknown_claim():
    assert [c.id for c in select("params-capsnet, affnist-gap")] == ["params-capsnet", "affnist-gap"]
    assert len(select(None)) == len(load_claims())
    with pytest.raises(CapsbenchError, match="unknown claim 'nope'.*known claims"):
        select("params-capsnet,nope")


def test_t_quantiles_and_seed_intervals_against_known_values():
    assert t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert t_quantile_975(4) == pytest.approx(2.776, abs=1e-3)
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)  # Cornish-Fisher branch
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4)
    s = seed_summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    half = 4.3027 / math.sqrt(3)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    one = seed_summary([0.99])
    assert one["n_seeds"] == 1 and math.isnan(one["ci_low"])
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_list_claims_command(capsys):
    assert main(["list", "claims"]) == 0
    out = capsys.readouterr().out
    for cid in REQUIRED:
        assert cid in out
