"""Claims registry, verdict rule and seed statistics (issue 4's foundations)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from capsbench.cli import main
from capsbench.core.errors import CapsbenchError
from capsbench.models import build_model
from capsbench.report.claims import VERDICTS, load_claims, select, verdict
from capsbench.report.stats import seed_summary, t_quantile_975
from capsbench.train.config import TrainConfig, train_config

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
        assert set(c.train) <= {f.name for f in dataclasses.fields(TrainConfig)}, c.id  # training overrides
    assert claims["mnist-error-baseline"].train == {"lr": 1e-4}  # lr 1e-3 leaves cnn-paper at chance


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
                    'model="capsnet"\noptions={}\npart="x"\ntable="t"\nvalue="accuracy"\nwhere={}\n')  # fmt: skip


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


def test_newcombe_and_wilson_against_published_values():
    """Newcombe (1998): 81/263 -> Wilson [0.2553, 0.3662]; 56/70 - 48/80 -> method 10 [0.0524, 0.3339]."""
    from capsbench.report.stats import newcombe_interval, wilson_interval

    assert wilson_interval(81, 263) == (pytest.approx(0.2553, abs=1e-4), pytest.approx(0.3662, abs=1e-4))
    assert newcombe_interval(56, 70, 48, 80) == (pytest.approx(0.0524, abs=1e-4), pytest.approx(0.3339, abs=1e-4))


def _adv(rows):
    import pandas as pd

    cols = ["model", "source_model", "attack", "eps", "accuracy", "n", "correct", "seed"]
    df = pd.DataFrame(rows, columns=cols).assign(loss="any")
    checks = pd.DataFrame([{"model": m, "check": c, "name": f"{m} {c}", "passed": True}
                           for m in ("capsnet", "cnn-pooled") for c in ("eps0", "iterative", "transfer", "worst")])  # fmt: skip
    return {"adversarial": df, "adversarial_checks": checks, "models": _models(capsnet=0.99, **{"cnn-pooled": 0.99})}


def _models(augment: str = "shift", input_size: int = 28, **accuracy: float):
    """tables/models.csv rows of well-trained (or not) models, for the claims' preconditions."""
    import pandas as pd

    return pd.DataFrame([{"model": m, "seed": 0, "test_accuracy": a, "test_n": 10000, "converged": True,
                          "convergence": "rule held", "augment": augment, "input_size": input_size}
                         for m, a in accuracy.items()])  # fmt: skip


def test_measure_difference_claim_one_seed_and_several():
    from capsbench.report.claims import claim_row, measure
    from capsbench.report.stats import newcombe_interval

    claim = load_claims()["adversarial-fgsm"]
    one = _adv([["capsnet", "capsnet", "fgsm", 0.1, 0.8, 1000, 800, 0],
                ["cnn-pooled", "cnn-pooled", "fgsm", 0.1, 0.6, 1000, 600, 0],
                ["capsnet", "cnn-pooled", "fgsm", 0.1, 0.1, 1000, 100, 0]])  # transfer rows are not white-box
    m = measure(claim, one)
    lo, hi = newcombe_interval(800, 1000, 600, 1000)
    assert m["mean"] == pytest.approx(20.0) and (m["ci_low"], m["ci_high"]) == (pytest.approx(100 * lo), pytest.approx(100 * hi))
    row = claim_row(claim, one, "quick")
    assert row["verdict"] == "reproduced" and "reduced protocol" in row["notes"]
    # a preset training under the paper's own protocol (canvas-stop) is not called reduced
    assert train_config("canvas-stop").paper_protocol and not train_config("quick").paper_protocol
    assert "reduced protocol" not in claim_row(claim, one, "canvas-stop", paper_protocol=True)["notes"]
    several = _adv([["capsnet", "capsnet", "fgsm", 0.1, a, 100, 100 * a, s] for s, a in enumerate([0.50, 0.52, 0.48])]
                   + [["cnn-pooled", "cnn-pooled", "fgsm", 0.1, a, 100, 100 * a, s] for s, a in enumerate([0.51, 0.50, 0.50])])
    m = measure(claim, several)
    s = seed_summary([-1.0, 2.0, -2.0])
    assert m["n_seeds"] == 3 and m["mean"] == pytest.approx(s["mean"]) and m["ci_low"] == pytest.approx(s["ci_low"])
    assert claim_row(claim, several, "full")["verdict"] == "inconclusive"  # the interval straddles 0


def test_a_failed_sanity_check_makes_the_claim_inconclusive():
    from capsbench.report.claims import claim_row

    claim = load_claims()["adversarial-fgsm"]
    tables = _adv([["capsnet", "capsnet", "fgsm", 0.1, 0.8, 1000, 800, 0], ["cnn-pooled", "cnn-pooled", "fgsm", 0.1, 0.6, 1000, 600, 0]])
    assert claim_row(claim, tables, "full")["verdict"] == "reproduced"
    checks = tables["adversarial_checks"]
    checks.loc[(checks.model == "cnn-pooled") & (checks.check == "iterative"), "passed"] = False  # the compared model's
    row = claim_row(claim, tables, "full")
    assert row["verdict"] == "inconclusive" and "sanity check failed: cnn-pooled iterative" in row["precondition"]
    assert row["precondition"].startswith("FAILED")
    del tables["adversarial_checks"]
    row = claim_row(claim, tables, "full")
    assert row["verdict"] == "inconclusive" and "none recorded" in row["precondition"]


def load_claims_text() -> str:
    from importlib import resources

    return resources.files("capsbench.report").joinpath("claims.toml").read_text()


def test_claims_file_with_an_unknown_check_is_refused():
    text = load_claims_text().replace('checks = ["eps0", "iterative", "transfer", "worst"]', 'checks = ["eps0", "vibes"]')
    with pytest.raises(CapsbenchError, match="claim 'adversarial-fgsm': unknown check 'vibes'; known checks: eps0"):
        load_claims(text)


def test_detection_claim_reads_detected_over_fooled():
    import pandas as pd

    from capsbench.report.claims import claim_row

    claim = load_claims()["reconstruction-detection"]
    det = pd.DataFrame([{"model": "capsnet", "attack": "autoattack", "loss": "standard", "eps": 0.3, "n": 1000,
                         "fooled": 900, "detected": 810, "seed": 0}])  # fmt: skip
    checks = pd.DataFrame([{"model": "capsnet", "check": "detector", "name": "fpr", "passed": True}])
    row = claim_row(claim, {"adversarial_detection": det, "adversarial_checks": checks, "models": _models(capsnet=0.99)},
                    "full")
    assert row["measured_mean"] == pytest.approx(90.0) and row["verdict"] == "reproduced"


def test_unmeasured_claims_are_not_run_and_error_claims_use_the_error():
    import pandas as pd

    from capsbench.report.claims import claim_row

    claims = load_claims()
    row = claim_row(claims["multimnist-error"], {}, "full")
    assert row["verdict"] == "not run" and math.isnan(row["measured_mean"])
    assert row["notes"] == "no multimnist measurement in this run (part multimnist)"
    routing = pd.DataFrame([{"model": "capsnet", "head": "dynamic", "measure": "worst-case", "eps": 0.1, "n": 100,
                             "correct": 60, "accuracy": 0.6, "seed": 0}])  # no capsnet-max-pool  # fmt: skip
    row = claim_row(claims["routing-capsule-vs-pooling"], {"routing": routing}, "full")
    assert row["verdict"] == "not run"
    assert row["notes"] == "capsnet-max-pool not in this run's routing table (part routing): add it with --models"
    t1 = pd.DataFrame([{"claim": "mnist-error-r3-recon", "model": "capsnet", "accuracy": 0.9975, "error": 0.0025,
                        "n": 10000, "correct": 9975, "seed": 0, "converged": True, "convergence": "held"}])  # fmt: skip
    row = claim_row(claims["mnist-error-r3-recon"], {"table1": t1}, "full")
    assert row["measured_mean"] == pytest.approx(0.25) and row["ci_low"] < 0.25 < row["ci_high"]
    assert row["verdict"] == "inconclusive"  # Wilson on 10k images is wider than the +-0.06 band
    params = pd.DataFrame([{"claim": "params-capsnet", "model": "capsnet", "params": 8215568, "seed": 0}])
    assert claim_row(claims["params-capsnet"], {"params": params}, "quick")["verdict"] == "reproduced"
    aff = pd.DataFrame([{"model": m, "transform": "composite", "accuracy": a, "n": 400, "correct": 400 * a, "seed": 0}
                        for m, a in (("capsnet", 0.5), ("cnn-pooled", 0.9))])  # fmt: skip
    canvas = _models("canvas", 40, capsnet=0.995, **{"cnn-pooled": 0.993})
    row = claim_row(claims["affnist-gap"], {"affine": aff, "models": canvas}, "full")
    assert row["verdict"] == "not reproduced" and "composite" in row["notes"] and row["precondition"].startswith("held")


def test_a_model_that_did_not_train_makes_its_claim_inconclusive():
    import pandas as pd

    from capsbench.report.claims import claim_row

    claims = load_claims()
    rows = [{"claim": "mnist-error-baseline", "model": "cnn-paper", "accuracy": a, "error": 1 - a, "n": 2000,
             "correct": round(2000 * a), "seed": 0, "train_failed": failed, "converged": True, "convergence": "held"}
            for a, failed in ((0.117, True),)]  # fmt: skip
    row = claim_row(claims["mnist-error-baseline"], {"table1": pd.DataFrame(rows)}, "quick")
    assert row["measured_mean"] == pytest.approx(88.3)  # the measurement stays in the table...
    assert row["verdict"] == "inconclusive" and "training failed" in row["notes"]  # ...but decides nothing
    rows[0].update(accuracy=0.5, error=0.5, correct=1000, train_failed=False)  # trained, just badly
    assert claim_row(claims["mnist-error-baseline"], {"table1": pd.DataFrame(rows)}, "quick")["verdict"] == "not reproduced"


def test_select_rows_is_white_box_float_tolerant_and_takes_the_first_listed_value_with_rows():
    import pandas as pd

    from capsbench.report.select import select_rows

    adv = pd.DataFrame({"model": ["a", "a", "a", "b"], "source_model": ["a", "b", "a", "b"],
                        "eps": [0.1, 0.1, 0.3 + 1e-12, 0.1], "accuracy": [0.5, 0.6, 0.2, 0.7]})  # fmt: skip
    rows, chosen = select_rows(adv, "a", {"eps": 0.1})
    assert rows.accuracy.tolist() == [0.5] and chosen == {"eps": 0.1}  # white-box only: not the row crafted on b
    rows, chosen = select_rows(adv, "a", {"eps": [0.2, 0.3]})
    assert rows.accuracy.tolist() == [0.2] and chosen == {"eps": 0.3}  # 0.2 has no rows; 0.3 within 1e-9
    assert select_rows(adv, "a", {"eps": 0.2})[0].empty and select_rows(adv, "a", {"attack": "fgsm"})[0].empty
    clean = pd.DataFrame({"model": ["a", "b"], "accuracy": [0.9, 0.8]})  # no source_model column: every row
    assert select_rows(clean, "b", {})[0].accuracy.tolist() == [0.8]


@pytest.mark.parametrize("n", [1, 7, 20, 40, 263, 1000, 10000])
def test_wilson_interval_contains_the_proportion_at_the_extremes(n):
    from capsbench.report.stats import wilson_interval

    for k in (0, n):
        lo, hi = wilson_interval(k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n, lo, hi)


def test_roc_auc_counts_pairs_and_ties():
    from capsbench.report.stats import roc_auc

    assert roc_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and roc_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert roc_auc([0.1, 0.5], [0.5]) == pytest.approx(0.75)  # one win, one tie over two pairs
    assert math.isnan(roc_auc([], [0.1])) and math.isnan(roc_auc([0.1], []))


def test_a_failed_precondition_makes_any_verdict_inconclusive_and_says_why():
    import pandas as pd

    from capsbench.report.claims import claim_row

    claims = load_claims()
    tables = _adv([["capsnet", "capsnet", "fgsm", 0.1, 0.8, 1000, 800, 0], ["cnn-pooled", "cnn-pooled", "fgsm", 0.1, 0.6, 1000, 600, 0]])
    row = claim_row(claims["adversarial-fgsm"], tables, "full")
    assert row["verdict"] == "reproduced" and row["precondition"].startswith("held: test accuracy >= 98.5%, converged")
    tables["models"] = _models(capsnet=0.99, **{"cnn-pooled": 0.9801})  # the compared model is under-trained
    row = claim_row(claims["adversarial-fgsm"], tables, "full")
    assert row["verdict"] == "inconclusive"
    assert row["precondition"] == "FAILED: test accuracy >= 98.5%: cnn-pooled seed 0 98.01% < 98.5%"
    del tables["models"]  # a run that recorded no models cannot show the precondition
    assert "no rows in tables/models.csv" in claim_row(claims["adversarial-fgsm"], tables, "full")["precondition"]
    # Table 1: a decisive interval (far from the paper) says nothing about the paper when the model had not converged
    t1 = pd.DataFrame([{"claim": "mnist-error-r3-recon", "model": "capsnet", "accuracy": 0.98, "error": 0.02, "n": 10000,
                        "correct": 9800, "seed": 0, "converged": False, "convergence": "one test evaluation only"}])  # fmt: skip
    row = claim_row(claims["mnist-error-r3-recon"], {"table1": t1}, "quick")
    assert row["verdict"] == "inconclusive" and "not converged (one test evaluation only)" in row["precondition"]
    t1["converged"] = True
    assert claim_row(claims["mnist-error-r3-recon"], {"table1": t1}, "quick")["verdict"] == "not reproduced"
    # affNIST: models trained at 28x28 are not the paper's protocol, however accurate
    aff = pd.DataFrame([{"model": m, "transform": "composite", "accuracy": a, "n": 400, "correct": 400 * a, "seed": 0}
                        for m, a in (("capsnet", 0.5), ("cnn-pooled", 0.9))])  # fmt: skip
    row = claim_row(claims["affnist-gap"], {"affine": aff, "models": _models(capsnet=0.996, **{"cnn-pooled": 0.995})}, "quick")
    assert row["verdict"] == "inconclusive" and "trained with augment=shift at 28x28" in row["precondition"]


@pytest.mark.parametrize("requires,message", [
    ('[{ key = "vibes", table = "models" }]', "unknown precondition key 'vibes'; known: accuracy, converged, protocol"),
    ('[{ key = "accuracy", table = "nowhere", at_least = 0.9 }]', "reads table 'nowhere', which no run writes"),
    ('[{ key = "converged", table = "clean" }]', "reads column converged, which table clean lacks"),
    ('[{ key = "accuracy", table = "models" }]', "precondition accuracy needs 'at_least'"),
    ('[{ key = "accuracy", table = "models", at_least = 99.2 }]', "accuracy.at_least must be a fraction in"),
    ('[{ key = "accuracy", table = "models", at_least = 0.9, over = 1 }]', "has no parameter 'over'"),
    ('{ key = "accuracy" }', "requires must be a list of inline tables"),
    ('[{ key = ["accuracy"], table = "models", at_least = 0.9 }]', "unknown precondition key ['accuracy']"),
    ('[{ key = "accuracy", table = "tta_curve", at_least = 0.9 }]', "reads column model or claim, which table tta_curve lacks"),
    ('[{ key = "protocol", table = "models", augment = "canvass" }]', "protocol.augment must be one of shift, canvas, none"),
    ('[{ key = "images", table = "models", at_least = 0.5 }]', "images.at_least must be an integer >= 0"),
])  # fmt: skip
def test_claims_file_with_a_bad_precondition_is_refused_at_load(requires, message):
    text = load_claims_text()
    old = ('requires = [\n  { key = "accuracy", table = "models", at_least = 0.985 },\n  { key = "converged", table = "models" },\n'
           '  { key = "dataset", table = "models", name = "mnist" },\n]')
    assert old in text
    with pytest.raises(CapsbenchError, match="claim 'adversarial-fgsm': requires") as e:
        load_claims(text.replace(old, f"requires = {requires}", 1))
    assert message in str(e.value)


def test_preconditions_need_a_row_for_every_compared_model_and_count_training_images():
    import pandas as pd

    from capsbench.report.claims import claim_row

    claims = load_claims()
    tables = _adv([["capsnet", "capsnet", "fgsm", 0.1, 0.8, 1000, 800, 0], ["cnn-pooled", "cnn-pooled", "fgsm", 0.1, 0.6, 1000, 600, 0]])
    tables["models"] = _models(capsnet=0.99)  # the compared model has no record: it cannot show the precondition
    row = claim_row(claims["adversarial-fgsm"], tables, "full")
    assert row["verdict"] == "inconclusive" and "no row for cnn-pooled in tables/models.csv" in row["precondition"]
    mm = pd.DataFrame([{"model": "capsnet", "seed": 0, "n": 1000, "error": 0.5, "correct_both": 500, "steps": s,
                        "batch_size": 32} for s in (300,)])  # fmt: skip
    row = claim_row(claims["multimnist-error"], {"multimnist": mm}, "quick")
    assert row["verdict"] == "inconclusive" and "capsnet seed 0 saw 9,600 training images" in row["precondition"]
    mm["steps"], mm["batch_size"] = 50000, 128
    assert claim_row(claims["multimnist-error"], {"multimnist": mm}, "full")["verdict"] == "not reproduced"


def test_a_suite_that_evaluates_no_claims_refuses_skip_claims(tmp_path, capsys):
    suite = tmp_path / "mine.toml"
    suite.write_text('models = ["capsnet"]\nparts = ["adversarial"]\n[skip_claims]\nadversarial-fgsm = "slow"\n')
    assert main(["run", str(suite), "--preset", "smoke", "--out", str(tmp_path / "x")]) == 2
    assert "skip_claims: suite mine evaluates no claims" in capsys.readouterr().err and not (tmp_path / "x").exists()
