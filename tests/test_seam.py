"""The part seam: a part registered outside capsbench (one decorator, no edit to report/ or run/)
gets its preset sizes applied, its table written, and its headline numbers into the report's
headline table, the summary and the MLflow metrics."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import pytest

from capsbench.cli import main
from capsbench.core.config import opt
from capsbench.parts.base import PARTS, PartResult, RunContext, part
from capsbench.report.folder import read_run
from capsbench.report.headline import HEADLINES, Headline
from capsbench.report.tables import TABLES
from capsbench.run.track import metrics


@dataclass(frozen=True)
class ToyConfig:
    n: int = opt(100, ge=1)  # its `full` size; smoke sizes it down


def run_toy(ctx: RunContext, cfg: ToyConfig) -> PartResult:
    """Each model's 'accuracy' is a number only this part knows: 1 / (n + index of the model)."""
    rows = [{"model": m, "accuracy": 1 / (cfg.n + i), "n": cfg.n, "seed": ctx.seed} for i, m in enumerate(ctx.models)]
    return PartResult(tables={"toy": pd.DataFrame(rows)}, summary="## Toy\n\nA throwaway part.")


@pytest.fixture
def toy_part():
    headline = [Headline("toy %", "toy_accuracy", "toy", about="Toy: a throwaway part's number.")]
    part("toy", ToyConfig, {"toy": ("model", "accuracy", "n", "seed")}, needs_training=False,
         sizing={"smoke": {"n": 4}}, headline=headline)(run_toy)  # fmt: skip
    yield
    for registry in (PARTS, TABLES, HEADLINES):
        registry.remove("toy")


def test_a_new_part_reaches_the_headline_summary_and_metrics(toy_part, shared_cache, tmp_path):
    suite = tmp_path / "toy.toml"
    suite.write_text('models = ["capsnet", "cnn-pooled"]\nparts = ["toy"]\n')
    out = tmp_path / "run"
    assert main(["run", str(suite), "--preset", "smoke", "--device", "cpu", "--out", str(out),
                 "--data-dir", str(shared_cache), "--no-progress"]) == 0  # fmt: skip
    toy = pd.read_csv(out / "tables" / "toy.csv")
    assert toy.n.tolist() == [4, 4]  # the part's smoke size, not its default 100
    report, summary = (out / "report.md").read_text(), (out / "summary.md").read_text()
    for text in (report, summary):
        assert "toy %" in text and "Toy: a throwaway part's number." in text
        assert "25.0 [" in text and "20.0 [" in text  # 1/4 and 1/5 as percentages, with intervals
    got = metrics(read_run(out, "R1"))
    assert got["toy_accuracy/capsnet"] == pytest.approx(0.25) and got["toy_accuracy/cnn-pooled"] == pytest.approx(0.2)


def test_a_part_s_sizing_and_headline_are_checked_when_it_registers(toy_part):
    with pytest.raises(Exception, match="unknown key bad sizing for preset smoke.m"):
        part("bad", ToyConfig, {"bad_t": ("model",)}, sizing={"smoke": {"m": 1}})(run_toy)
    with pytest.raises(ValueError, match="reads table 'elsewhere'"):
        part("bad", ToyConfig, {"bad_t": ("model",)}, headline=[Headline("x", "x", "elsewhere")])(run_toy)
    assert "bad" not in PARTS and "bad_t" not in TABLES


def test_a_suite_file_overrides_a_part_s_sizing_and_set_overrides_both(toy_part):
    from capsbench.suite import RunRequest, resolve

    raw = {"models": ["cnn-pooled"], "parts": ["toy"], "preset": {"smoke": {"toy": {"n": 6}}}}
    assert resolve(raw, "t", RunRequest("t", preset="smoke", device="cpu")).parts["toy"].n == 6
    assert resolve(raw, "t", RunRequest("t", preset="quick", device="cpu")).parts["toy"].n == 100
    raw["toy"] = {"n": 7}  # the suite's own table: every preset, over the part's sizes
    assert resolve({**raw, "preset": {}}, "t", RunRequest("t", preset="smoke", device="cpu")).parts["toy"].n == 7
    req = RunRequest("t", preset="smoke", device="cpu", sets=("toy.n=9",))
    assert resolve(raw, "t", req).parts["toy"].n == 9
