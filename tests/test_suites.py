"""Every registered suite runs end to end on the smoke preset (real MNIST, real models) and
writes the documented files and columns; reruns reuse the cached models and never overwrite."""

from __future__ import annotations

import pandas as pd
import pytest

from capsbench.cli import main
from capsbench.suite import known_suites
from capsbench.train.convergence import RECORD_COLUMNS

pytestmark = pytest.mark.slow  # every test here runs suites end to end on real MNIST

COLUMNS = {
    "clean": {"model", "accuracy", "n", "seed"},
    "models": set(RECORD_COLUMNS),
    "affine": {"model", "transform", "value", "accuracy", "n", "seed"},
    "adversarial": {"model", "attack", "eps", "accuracy", "n", "source_model", "seed"},
    "throughput": {"model", "mode", "device", "dtype", "batch_size", "samples_per_sec", "step_ms_median",
                   "step_ms_iqr", "peak_mem_mb", "params", "macs_per_sample"},  # fmt: skip
}
PART_TABLES = {"affine": ["affine"], "adversarial": ["adversarial"], "throughput": ["throughput"],
               "capsules": ["capsules_reconstruction", "capsules_routing"], "tta": ["tta", "tta_curve"],
               "corruptions": ["corruptions"], "routing": ["routing", "routing_stats"],
               "routing-iterations": ["routing_iterations"],
               "viewpoints": ["viewpoints", "viewpoints_checks"]}


def run(suite: str, out, cache, *extra: str) -> int:
    return main(["run", suite, "--preset", "smoke", "--device", "cpu", "--out", str(out),
                 "--data-dir", str(cache), "--no-progress", *extra])  # fmt: skip


def assert_report_has_every_plot(folder) -> None:
    """report.md links and report.html embeds every plot of the run folder."""
    html = (folder / "report.html").read_text()
    md = (folder / "report.md").read_text()
    plots = sorted((folder / "plots").glob("*.png"))
    assert plots and html.count("src='data:image/png;base64,") == len(plots)
    for p in plots:
        assert f"<figcaption>{p.name}</figcaption>" in html and f"(plots/{p.name})" in md
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing fetched


# `paper` trains Table 1's five variants; tests/test_paper.py runs it with a subset of claims.
@pytest.mark.parametrize("suite", sorted(s for s in known_suites() if s != "paper"))
def test_suite_runs_end_to_end_on_smoke(suite, shared_cache, tmp_path, capsys, request):
    if suite == "robustness":  # run once for the session (tests/conftest.py), as the printed path shows
        out = request.getfixturevalue("robustness_smoke")
    else:
        if suite == "viewpoints":  # smallNORB is not offline: tiny format-true files in the shared cache
            from tests.test_viewpoints import cache_tiny_smallnorb

            cache_tiny_smallnorb(shared_cache)
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
    assert_report_has_every_plot(out)
    assert not list(out.rglob("*.tmp"))  # no temp files left behind


def test_robustness_smoke_numbers_are_consistent(robustness_smoke, shared_cache, tmp_path):
    out = robustness_smoke
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
    models = pd.read_csv(out / "tables" / "models.csv").set_index("model")
    assert list(models.columns) == list(RECORD_COLUMNS[1:]) and set(models.index) == {"capsnet", "cnn-pooled"}
    assert (models.images_seen == models.steps * models.batch_size).all() and models.epochs.tolist() == [pytest.approx(60 * 32 / 4096, abs=1e-3)] * 2
    assert not models.converged.any()  # under two epochs: convergence not shown
    assert (models.floor == 0).all() and models.meets_floor.all()  # smoke has no floor
    assert "## Models" in summary and "no: no two test evaluations an epoch apart" in summary
    again = tmp_path / "again"
    # another suite, same protocol: its models come from the cache (one cheap part: the
    # adversarial suite itself runs in test_suite_runs_end_to_end_on_smoke)
    assert run("adversarial", again, shared_cache, "--set", 'parts=["capsules"]') == 0
    assert (again / "summary.md").read_text().count("| yes |") == 2


def test_results_are_never_overwritten(shared_cache, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    assert run("throughput", out, shared_cache) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_seeds_give_one_row_per_seed_and_a_t_interval(shared_cache, tmp_path):
    """--seeds trains per seed; tables keep one row per seed; summaries aggregate over seeds."""
    out = tmp_path / "seeds"
    assert run("adversarial", out, shared_cache, "--seeds", "0,1", "--set", "train.steps=20",
               "--set", "adversarial.n=16", "--set", "adversarial.eps=[0.0, 0.1]") == 0  # fmt: skip
    clean = pd.read_csv(out / "tables" / "clean.csv")
    assert sorted(clean.seed) == [0, 0, 1, 1] and set(clean.model) == {"capsnet", "cnn-pooled"}
    adv = pd.read_csv(out / "tables" / "adversarial.csv")
    assert set(adv.seed) == {0, 1}
    summary = (out / "summary.md").read_text()
    assert "2 seeds, t)" in summary and "## Seed 1" in summary
    assert {p.name for p in (out / "plots").glob("adversarial_accuracy_seed*.png")} == {
        "adversarial_accuracy_seed0.png", "adversarial_accuracy_seed1.png"}
    assert_report_has_every_plot(out)


def test_report_compares_two_runs_and_lists_config_differences(shared_cache, tmp_path, capsys):
    a, b, rep = tmp_path / "a", tmp_path / "b", tmp_path / "rep"
    assert run("throughput", a, shared_cache) == 0
    assert run("throughput", b, shared_cache, "--set", "throughput.repeats=3") == 0
    assert main(["report", str(a), str(b), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    assert "## Configuration differences" in md and "| throughput.repeats | 2 | 3 |" in md
    assert md.count("| R1 † | capsnet |") == 1 and md.count("| R2 † | cnn-pooled |") == 1
    assert "not comparable to the paper" in md
    html = (rep / "report.html").read_text()
    n_plots = len(list((a / "plots").glob("*.png"))) + len(list((b / "plots").glob("*.png")))
    assert html.count("data:image/png;base64,") == n_plots
    capsys.readouterr()
    assert main(["report", str(a), "--out", str(rep)]) == 2  # never overwrites
    assert main(["report", str(tmp_path / "nothing")]) == 2  # not a run folder: one line
    err = capsys.readouterr().err
    assert "never overwritten" in err and "not a capsbench run folder" in err and "Traceback" not in err
