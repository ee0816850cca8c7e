"""Every registered suite runs end to end on the smoke preset (real MNIST, real models) and
writes the documented files and columns; reruns reuse the cached models and never overwrite."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from capsbench.cli import main
from capsbench.data.mnist import cache_dir
from capsbench.runner import known_suites

COLUMNS = {
    "clean": {"model", "accuracy", "n", "seed"},
    "affine": {"model", "transform", "value", "accuracy", "n", "seed"},
    "adversarial": {"model", "attack", "eps", "accuracy", "n", "source_model", "seed"},
    "throughput": {"model", "mode", "device", "dtype", "batch_size", "samples_per_sec", "step_ms_median",
                   "step_ms_iqr", "peak_mem_mb", "params", "macs_per_sample"},  # fmt: skip
}
PART_TABLES = {"affine": ["affine"], "adversarial": ["adversarial"], "throughput": ["throughput"]}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the whole session: MNIST copied from the user's cache when present."""
    root = tmp_path_factory.mktemp("cache")
    user = cache_dir() / "mnist.pt"
    if user.exists():
        shutil.copy(user, root / "mnist.pt")
    return root


def run(suite: str, out, cache, *extra: str) -> int:
    return main(["run", suite, "--preset", "smoke", "--device", "cpu", "--out", str(out),
                 "--data-dir", str(cache), "--no-progress", *extra])  # fmt: skip


@pytest.mark.parametrize("suite", sorted(known_suites()))
def test_suite_runs_end_to_end_on_smoke(suite, shared_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(suite, out, shared_cache) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)  # the folder path is printed last
    for name in ("config.toml", "env.json", "summary.md"):
        assert (out / name).is_file()
    import tomllib

    config = tomllib.loads((out / "config.toml").read_text())
    tables = {p.stem for p in (out / "tables").glob("*.csv")}
    for part in config["parts"]:
        for t in PART_TABLES[part]:
            assert t in tables
    for t in tables & set(COLUMNS):
        df = pd.read_csv(out / "tables" / f"{t}.csv")
        assert COLUMNS[t] <= set(df.columns), t
        assert len(df) > 0
    assert list((out / "plots").glob("*.png"))
    assert not list(out.rglob("*.tmp"))  # no temp files left behind


def test_robustness_smoke_numbers_are_consistent(shared_cache, tmp_path):
    out = tmp_path / "run"
    assert run("robustness", out, shared_cache) == 0
    clean = pd.read_csv(out / "tables" / "clean.csv").set_index("model")
    adv = pd.read_csv(out / "tables" / "adversarial.csv")
    adv_clean = pd.read_csv(out / "tables" / "adversarial_clean.csv").set_index("model")
    wb = adv[adv.model == adv.source_model]
    for model, g in wb.groupby("model"):
        base = adv_clean.loc[model]
        assert (g.n == base.n).all()  # the smoke preset attacks every image with every attack
        assert (g[g.eps == 0].correct == base.correct).all()  # eps=0 equals clean, exactly
        assert (g[g.attack.isin(["fgsm", "pgd"])].accuracy <= base.accuracy).all()  # noise may go either way
        assert clean.loc[model, "accuracy"] > 0.5  # smoke training works on real MNIST
    aff = pd.read_csv(out / "tables" / "affine.csv")
    assert set(aff["transform"]) >= {"clean", "rotation", "scale", "shear", "translation", "composite"}
    assert "affnist" not in set(aff["transform"])  # no path given: the row is absent, not faked
    summary = (out / "summary.md").read_text()
    assert "not comparable to the paper" in summary and "Sanity checks" in summary
    again = tmp_path / "again"
    assert run("adversarial", again, shared_cache) == 0  # same protocol: the models come from the cache
    assert (again / "summary.md").read_text().count("| yes |") == 2


def test_results_are_never_overwritten(shared_cache, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    assert run("throughput", out, shared_cache) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
