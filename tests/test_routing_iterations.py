"""The routing-iterations part (the EM paper's ablation): its rows, the refusal of a model without
routing iterations, the routing suite's presets, and the claim's rule on constructed tables
(judged on smallNORB only; error(1) against the better of 2 and 3 iterations, Newcombe interval)."""

from __future__ import annotations

from importlib import resources
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from capsbench.cli import main
from capsbench.core.config import from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.parts.base import PARTS, RunContext
from capsbench.parts.routing_iterations import COLUMNS, RoutingIterationsConfig, result_row
from capsbench.report.claims import claim_row, load_claims
from capsbench.train.config import TrainConfig

TINY_EM = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": [32, 64], "routing": "em"}  # as in a run's meta


def routing_iterations_case(data, root):
    """The tiny case for tests/test_parts.py's CASES: a tiny capsnet-em, 2 steps per variant."""
    train = TrainConfig(steps=2, batch_size=8, augment="none", test_subset=16, log_every=1, amp="fp32")
    ctx = RunContext(models={"capsnet-em": SimpleNamespace(meta={"options": TINY_EM})}, test_x=data.test_x,
                     test_y=data.test_y, train_cfg=train, device=torch.device("cpu"), dtype=None, seed=0,
                     progress=False, data=data, cache_root=str(root))  # fmt: skip
    return ctx, RoutingIterationsConfig(test_n=32)


# ---- the rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("correct,n", [(0, 50), (50, 50), (37, 50), (1, 1000)])
def test_a_row_holds_its_error_in_percent_inside_its_interval(correct, n):
    tm = SimpleNamespace(name="capsnet-em", cached=True, model=SimpleNamespace(num_classes=10),
                         meta={"steps": 4, "params": 123, "train_seconds": 1.5})  # fmt: skip
    row = result_row(tm, 2, correct, n, TrainConfig(batch_size=8), seed=3)
    assert set(row) == set(COLUMNS)
    assert row["errors"] == n - correct and row["error"] == pytest.approx(row["error_pct"] / 100)
    assert 0 <= row["error_low_pct"] <= row["error_pct"] <= row["error_high_pct"] <= 100
    assert (row["iters"], row["seed"], row["dataset"], row["batch_size"]) == (2, 3, "mnist", 8)
    assert row["train_failed"] == (correct / n < 0.2)  # below 2x chance: the variant did not learn


def test_a_model_without_routing_iterations_is_refused_in_one_line():
    from capsbench.suite import RunRequest, find_suite, read_suite, resolve

    raw = read_suite(find_suite("routing"))
    for model, why in (("cnn-pooled", "it has no routing_iters option"),
                       ("capsnet-uniform", "its routing head uniform does not iterate")):  # fmt: skip
        req = RunRequest("routing", preset="standard", device="cpu", sets=(f"routing-iterations.model={model}",))
        with pytest.raises(CapsbenchError) as e:
            resolve(raw, "routing", req)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"routing-iterations.model: {model} cannot be ablated ({why})")
        assert "models with routing iterations: capsnet, capsnet-em, matrix-capsnet-em" in msg
    with pytest.raises(CapsbenchError, match="iters must be distinct"):
        from_dict(RoutingIterationsConfig, {"iters": [1, 2, 2]}, "routing-iterations")


def test_the_routing_suite_runs_the_part_at_standard_and_full_only_and_evaluates_its_claim():
    from capsbench.run.plan import select_claims
    from capsbench.suite import RunRequest, find_suite, read_suite, resolve

    raw = read_suite(find_suite("routing"))
    for preset, runs in (("smoke", False), ("quick", False), ("standard", True), ("full", True)):
        r = resolve(raw, "routing", RunRequest("routing", preset=preset, device="cpu"))
        claims, _ = select_claims(r, ())
        assert ("routing-iterations" in r.parts) == runs == ("routing-iterations" in {c.id for c in claims}), preset
    assert r.parts["routing-iterations"] == RoutingIterationsConfig()  # full: every test image, the run's length
    assert PARTS.get("routing-iterations").sized("smoke") == {"steps": 4, "batch_size": 8, "test_n": 256}


# ---- the claim's rule on constructed tables -----------------------------------------------------


def table(errors: dict[int, int], n: int = 2000, dataset: str = "smallnorb", seed: int = 0) -> pd.DataFrame:
    """routing_iterations rows of capsnet-em: ``errors`` test errors out of ``n`` per iteration count."""
    return pd.DataFrame([{"model": "capsnet-em", "dataset": dataset, "iters": k, "seed": seed, "n": n, "errors": e,
                          "error": e / n, "accuracy": 1 - e / n, "train_failed": False}
                         for k, e in errors.items()])  # fmt: skip


def judge(df: pd.DataFrame) -> dict:
    return claim_row(load_claims()["routing-iterations"], {"routing_iterations": df}, "full")


def test_one_iteration_clearly_worse_is_reproduced_against_the_better_of_two_and_three():
    row = judge(table({1: 200, 2: 50, 3: 40, 5: 80}))  # 10% against 2.5% and 2.0%: the paper's shape
    assert row["verdict"] == "reproduced" and row["precondition"].startswith("held: trained on smallnorb")
    assert row["measured_mean"] == pytest.approx(100 * (200 - 40) / 2000)  # against 3 iterations, the better
    assert 0 < row["ci_low"] < row["measured_mean"] < row["ci_high"]
    assert "Newcombe" in row["notes"] and "seed 0: iters = 3" in row["notes"]
    assert judge(table({1: 200, 2: 30, 3: 40}))["measured_mean"] == pytest.approx(100 * (200 - 30) / 2000)


@pytest.mark.parametrize("errors,allowed", [
    ({1: 50, 2: 50, 3: 52}, {"inconclusive"}),  # equal errors: the interval straddles 0
    ({1: 20, 2: 100, 3: 120}, {"not reproduced"}),  # one iteration clearly better
])  # fmt: skip
def test_equal_or_lower_error_at_one_iteration_is_not_reproduced(errors, allowed):
    row = judge(table(errors))
    assert row["verdict"] in allowed and row["precondition"].startswith("held")
    assert row["ci_low"] <= row["measured_mean"] <= row["ci_high"]


def test_on_mnist_the_claim_is_not_judged_whatever_the_numbers():
    row = judge(table({1: 200, 2: 50, 3: 40}, dataset="mnist"))
    assert row["verdict"] == "inconclusive"
    assert row["notes"].startswith("not judged: the claim is about smallnorb, and this run trained on mnist")
    assert "FAILED: trained on smallnorb: capsnet-em seed 0 trained on mnist" in row["precondition"]


def test_missing_iteration_counts_fail_the_precondition_and_several_seeds_use_a_t_interval():
    row = judge(table({1: 200, 3: 40, 5: 80}))  # no 2-iteration variant: not the claim's comparison
    assert row["verdict"] == "inconclusive" and "capsnet-em seed 0 lacks 2 routing iterations" in row["precondition"]
    assert judge(table({2: 50, 3: 40}))["verdict"] == "not run"  # nothing at 1 iteration to compare
    seeds = pd.concat([table({1: 200 + 10 * s, 2: 50 - s, 3: 40 + 5 * s}, seed=s) for s in range(3)])
    row = judge(seeds)  # per seed the better of 2 and 3: 3 (40 < 50), 3 (45 < 49), 2 (48 < 50)
    assert row["verdict"] == "reproduced" and row["n_seeds"] == 3 and "t-interval over 3 seeds" in row["notes"]
    assert "seed 0: iters = 3, seed 1: iters = 3, seed 2: iters = 2" in row["notes"]
    assert row["measured_mean"] == pytest.approx(100 * ((200 - 40) + (210 - 45) + (220 - 48)) / 3 / 2000)


def test_claims_file_with_a_bad_best_of_or_iteration_list_is_refused():
    text = resources.files("capsbench.report").joinpath("claims.toml").read_text()
    cases = (("best_of = { iters = [2, 3] }", "best_of = { iters = [] }", "best_of must be one column"),
             ("present = [1, 2, 3]", "present = [1, 0]", "iterations.present must be a non-empty list"))
    for old, new, message in cases:
        assert old in text
        with pytest.raises(CapsbenchError, match=message):
            load_claims(text.replace(old, new))


# ---- the part end to end ---------------------------------------------------------------------------


def run_routing(out, cache, *extra: str) -> int:
    """The routing suite with only this part and a tiny capsnet-em, on real MNIST (smoke sizes).
    The claim's counts 1, 2, 3 only: 5 EM iterations can hit float denormals on a CPU (10x slower)."""
    return main(["run", "routing", "--preset", "smoke", "--device", "cpu", "--out", str(out), "--data-dir", str(cache),
                 "--no-progress", "--models", "capsnet-em", "--set", 'parts=["routing-iterations"]',
                 "--set", "train.test_subset=64", "--set", "model.capsnet-em.conv_channels=16",
                 "--set", "model.capsnet-em.primary_types=4", *extra])  # fmt: skip


@pytest.mark.slow  # trains three tiny capsnet-em variants on real MNIST
def test_the_part_trains_a_variant_per_count_caches_them_and_leaves_the_claim_unjudged_on_mnist(shared_cache, tmp_path):
    out = tmp_path / "run"
    assert run_routing(out, shared_cache, "--set", "routing-iterations.iters=[1, 2, 3]") == 0
    df = pd.read_csv(out / "tables" / "routing_iterations.csv")
    assert tuple(df.columns) == COLUMNS and list(df.iters) == [1, 2, 3]
    assert (df.n == 256).all() and (df.steps == 4).all() and set(df.dataset) == {"mnist"} and not df.from_cache.any()
    assert ((0 <= df.error_low_pct) & (df.error_low_pct <= df.error_pct) & (df.error_pct <= df.error_high_pct)
            & (df.error_high_pct <= 100)).all()  # fmt: skip
    assert (out / "plots" / "routing_iterations.png").is_file()
    assert "## Routing iterations (the EM ablation)" in (out / "summary.md").read_text()
    claims = pd.read_csv(out / "claims.csv").set_index("claim")
    assert list(claims.index) == ["routing-iterations"]  # the routing suite evaluates its parts' claims unasked
    assert claims.loc["routing-iterations", "verdict"] == "inconclusive"
    assert claims.loc["routing-iterations", "notes"].startswith("not judged")
    again = tmp_path / "again"  # finished variants are cache entries: a later (or resumed) run trains none
    assert run_routing(again, shared_cache, "--set", "routing-iterations.iters=[3, 1]") == 0
    df2 = pd.read_csv(again / "tables" / "routing_iterations.csv").set_index("iters")
    assert df2.from_cache.all() and (df2.errors == df.set_index("iters").errors.loc[[3, 1]]).all()
