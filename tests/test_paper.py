"""`run paper`: claims measured from a real (smoke) run, claims.csv, the claims section of the
report, and --claims narrowing the work to what the chosen claims need."""

from __future__ import annotations

import math
import tomllib

import pandas as pd
import pytest

from capsbench.cli import main
from capsbench.report.claims import VERDICTS, load_claims
from tests.test_suites import assert_report_has_every_plot

CLAIMS = "params-capsnet,params-baseline,mnist-error-r1-norecon,affnist-gap,adversarial-fgsm,multimnist-error"
COLUMNS = ["claim", "paper_value", "unit", "band", "measured_mean", "ci_low", "ci_high", "n_seeds", "verdict", "precondition", "notes"]


def run_paper(out, cache, *extra: str) -> int:
    return main(["run", "paper", "--preset", "smoke", "--device", "cpu", "--out", str(out), "--data-dir", str(cache),
                 "--no-progress", "--set", "train.steps=20", *extra])  # fmt: skip


@pytest.mark.slow
def test_run_paper_measures_the_chosen_claims(shared_cache, tmp_path):
    out = tmp_path / "paper"
    assert run_paper(out, shared_cache, "--claims", CLAIMS) == 0
    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == COLUMNS
    assert list(claims.claim) == CLAIMS.split(",")
    assert set(claims.verdict) <= set(VERDICTS) and "not run" not in set(claims.verdict)  # all were measured
    by = claims.set_index("claim")
    assert by.loc["params-capsnet", "measured_mean"] == pytest.approx(8.215568)
    assert by.loc["params-capsnet", "verdict"] == "reproduced"  # an exact count inside 8.2 +- 0.05
    for cid in ("mnist-error-r1-norecon", "affnist-gap", "adversarial-fgsm", "multimnist-error"):
        row = by.loc[cid]
        assert row.ci_low <= row.measured_mean <= row.ci_high, cid
        assert "reduced protocol (preset smoke)" in row.notes, cid
    t1 = pd.read_csv(out / "tables" / "table1.csv")
    assert list(t1.claim) == ["mnist-error-r1-norecon"]  # only the variant a chosen claim needs was trained
    assert not t1.converged.any() and t1.epochs.iloc[0] == pytest.approx(20 * 32 / 4096, abs=1e-3)  # 20 steps: not converged
    row = by.loc["mnist-error-r1-norecon"]  # so its verdict cannot be decisive, whatever its interval
    assert row.verdict == "inconclusive" and row.precondition.startswith("FAILED: converged: capsnet seed 0 not converged")
    assert by.loc["adversarial-fgsm", "precondition"].startswith("FAILED: test accuracy >= 98.5%")  # smoke models
    assert pd.read_csv(out / "tables" / "models.csv").model.tolist() == ["capsnet", "cnn-pooled"]
    err = 100 * t1.error.iloc[0]
    assert by.loc["mnist-error-r1-norecon", "measured_mean"] == pytest.approx(err, abs=1e-3)
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["claims"] == CLAIMS.split(",") and config["parts"] == ["table1", "affine", "adversarial", "multimnist"]
    mm = pd.read_csv(out / "tables" / "multimnist.csv")
    assert set(mm.model) == {"capsnet", "cnn-pooled"} and mm.error.between(0, 1).all()
    md = (out / "report.md").read_text()
    assert "## Paper claims" in md and "params-capsnet" in md
    assert_report_has_every_plot(out)


@pytest.mark.slow
def test_claims_only_counting_parameters_train_nothing(shared_cache, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "params"
    assert run_paper(out, shared_cache, "--claims", "params-capsnet-nodecoder,params-baseline") == 0
    claims = pd.read_csv(out / "claims.csv").set_index("claim")
    assert (claims.verdict == "reproduced").all()
    assert claims.loc["params-baseline", "measured_mean"] == pytest.approx(35.445522)
    assert not (out / "tables" / "table1.csv").exists()
    assert "trained" not in capsys.readouterr().err  # no model was trained or fetched


@pytest.mark.slow
def test_claims_a_suite_cannot_measure_are_refused(shared_cache, tmp_path, capsys):  # noqa: F811
    assert main(["run", "throughput", "--preset", "smoke", "--out", str(tmp_path / "x"), "--data-dir", str(shared_cache),
                 "--claims", "adversarial-fgsm"]) == 2  # fmt: skip
    assert main(["run", "paper", "--claims", "nope", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "need part 'adversarial'" in err and "unknown claim 'nope'" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any work


def test_every_claim_names_a_part_of_a_suite_that_evaluates_claims():
    from capsbench.run.plan import CLAIM_SUITES

    parts = {p for s in CLAIM_SUITES for p in tomllib.loads(open(f"suites/{s}.toml").read())["parts"]}
    for c in load_claims().values():
        assert c.part in parts, c.id
        assert not math.isnan(c.band[0]) and c.table


def test_the_standard_paper_run_leaves_out_what_does_not_fit_on_a_cpu_and_says_why():
    """`run paper --preset standard` evaluates the claims that fit on a CPU, narrows its parts to
    theirs, and lists each left-out claim as not run with the preset's reason; --claims overrides."""
    from capsbench.parts import load_parts
    from capsbench.run.plan import select_claims
    from capsbench.runner import evaluate_claims
    from capsbench.suite import RunRequest, find_suite, read_suite, resolve

    load_parts()
    r = resolve(read_suite(find_suite("paper")), "paper", RunRequest("paper", preset="standard", device="cpu"))
    left_out = {"mnist-error-baseline", "affnist-capsnet", "affnist-gap", "multimnist-error"}
    assert set(r.skip_claims) == left_out and r.train.schedule == "onecycle" and r.train.input_size == 28
    claims, narrowed = select_claims(r, ())
    papers = {c.id for c in load_claims().values() if c.part in r.parts}  # the routing suite's claims are not the paper's
    assert {c.id for c in claims} == papers - left_out and "routing-uniform-robust" not in papers
    assert list(narrowed.parts) == ["table1", "adversarial"]  # affine and multimnist are not run at all
    assert "mnist-error-baseline" not in narrowed.parts["table1"].claims and len(narrowed.parts["table1"].claims) == 7
    assert list(r.parts) == ["table1", "affine", "adversarial", "multimnist"]  # selecting changed nothing
    rows = evaluate_claims(list(claims), {}, narrowed).set_index("claim")
    assert set(rows.index) == papers and (rows.loc[sorted(left_out), "verdict"] == "not run").all()
    assert list(rows.reset_index().columns) == COLUMNS and rows.n_seeds.dtype.kind == "i"  # every column, counts as ints
    assert rows.loc["mnist-error-baseline", "notes"].startswith("left out by suite paper, preset standard: the paper's baseline CNN")
    named, again = select_claims(r, ("mnist-error-baseline",))
    assert [c.id for c in named] == ["mnist-error-baseline"]
    assert again.skip_claims == {} and r.skip_claims  # named claims run, whatever the preset leaves out


def test_skip_claims_with_an_unknown_claim_or_no_reason_is_refused(tmp_path, capsys):
    suite = tmp_path / "mine.toml"
    for bad, needle in (('nope = "too slow"', "skip_claims: unknown claim 'nope'"),
                        ('adversarial-fgsm = ""', "skip_claims must be a table of claim id")):  # fmt: skip
        suite.write_text(f'models = ["capsnet"]\nparts = ["adversarial"]\n[skip_claims]\n{bad}\n')
        assert main(["run", str(suite), "--preset", "smoke", "--out", str(tmp_path / "x")]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
