"""`--track mlflow`: a real smoke run logged to a real MLflow store (SQLite under tmp_path): params,
headline metrics, tags and artifacts arrive; the default store is ./mlruns and nothing else; bad
arguments, a missing MLflow and an unreachable server are one-line errors; importing capsbench
never imports MLflow."""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest

from capsbench.cli import main
from capsbench.core.errors import CapsbenchError
from capsbench.parts import load_parts
from capsbench.report.document import flatten, headline
from capsbench.report.folder import Run, read_run
from capsbench.run.track import metrics, open_tracker

EXPERIMENT = "capsbench-throughput"


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_folder(shared_cache, tmp_path_factory):
    """One `run throughput --preset smoke --track mlflow` folder (about 10 s on a CPU), logged by
    the command line itself into ``<folder>/../cli/mlflow.db``."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("track")
    out = root / "run"
    with contextlib.chdir(root):  # an explicit SQLite store keeps its artifacts in ./mlruns
        assert main(["run", "throughput", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                     "--data-dir", str(shared_cache), "--no-progress", "--track", "mlflow",
                     "--track-uri", f"sqlite:///{root / 'cli' / 'mlflow.db'}"]) == 0  # fmt: skip
    return out


def only_run(uri: str):
    """The one MLflow run of EXPERIMENT in the store at ``uri``."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


# --- no MLflow needed -----------------------------------------------------------------------------


@pytest.mark.slow
def test_importing_capsbench_does_not_import_mlflow():
    proc = python("import sys, capsbench.run.track, capsbench.cli; print('mlflow' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("kind, uri, message", [
    ("wandb", None, "unknown tracker 'wandb'; known trackers: mlflow"),
    (None, "sqlite:///x.db", "--track-uri needs --track mlflow"),
    ("mlflow", "  ", "--track-uri is empty"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_any_work(kind, uri, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CapsbenchError, match=re.escape(message)):
        open_tracker(kind, uri)
    assert open_tracker(None, None) is None
    assert not os.listdir(tmp_path)


MISSING_MLFLOW = """
import sys
sys.modules["mlflow"] = None
from capsbench.run.track import open_tracker
try:
    open_tracker("mlflow", None)
except Exception as e:
    print(type(e).__name__, e)
"""


def test_missing_mlflow_is_a_one_line_error(tmp_path):
    # sys.modules['mlflow'] = None makes `import mlflow` raise ImportError for real
    proc = python(MISSING_MLFLOW)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CapsbenchError --track mlflow needs MLflow")
    assert 'pip install -e ".[mlflow]"' in proc.stdout and proc.stdout.count("\n") == 1


def small_run(folder) -> Run:
    """A Run of hand-made tables: two seeds of capsnet, one of cnn, transfer rows that must not count."""
    clean = pd.DataFrame({"model": ["capsnet", "capsnet", "cnn"], "accuracy": [0.98, 0.99, 0.97], "n": 1000,
                          "seed": [0, 1, 0], "params": [8215568, 8215568, 35000]})  # fmt: skip
    adv = pd.DataFrame([("capsnet", "fgsm", "any", 0.1, 0.5, "capsnet"),
                        ("capsnet", "fgsm", "margin", 0.1, 0.6, "capsnet"),
                        ("capsnet", "pgd", "any", 0.1, 0.3, "capsnet"),
                        ("capsnet", "autoattack", "standard", 0.1, 0.25, "capsnet"),
                        ("capsnet", "worst-case", "any", 0.1, 0.2, "capsnet"),
                        ("capsnet", "worst-case", "any", 0.3, 0.05, "capsnet"),
                        ("capsnet", "fgsm", "any", 0.1, 0.9, "cnn"), ("cnn", "fgsm", "any", 0.1, 0.4, "cnn")],
                       columns=["model", "attack", "loss", "eps", "accuracy", "source_model"])  # fmt: skip
    affine = pd.DataFrame({"model": ["capsnet"], "transform": ["composite"], "value": [0.0], "accuracy": [0.8],
                           "n": 1000, "seed": 0})  # fmt: skip
    speed = pd.DataFrame({"model": "capsnet", "mode": ["train", "train", "inference"], "batch_size": [8, 32, 8],
                          "dtype": "fp32", "samples_per_sec": [100.0, 150.5, 500.0], "repeats": 5})  # fmt: skip
    trained = pd.DataFrame({"model": ["capsnet"], "test_accuracy": [0.985], "test_n": [512], "epochs": [2.5],
                            "converged": [True], "floor": [0.9], "meets_floor": [True]})  # fmt: skip
    tables = {"clean": clean, "adversarial": adv.assign(n=500, seed=0), "affine": affine, "throughput": speed,
              "models": trained}  # fmt: skip
    config = {"models": ["capsnet", "cnn"], "parts": ["affine", "adversarial", "throughput"], "preset": "smoke"}
    return Run(folder, "R1", config, {}, tables, [])


def test_metrics_are_the_headline_numbers(tmp_path):
    """Every number the headline shows becomes a metric (and only those), with the same value."""
    run = small_run(tmp_path)
    got = metrics(run)
    assert got["clean_accuracy/capsnet"] == pytest.approx(0.985) and got["clean_accuracy/cnn"] == pytest.approx(0.97)
    assert got["fgsm_eps0.1_accuracy/capsnet"] == 0.5  # the worst case over losses, white-box only
    assert got["worst_case_eps0.3_accuracy/capsnet"] == 0.05 and got["autoattack_eps0.1_accuracy/capsnet"] == 0.25
    assert got["train_images_per_s/capsnet"] == 150.5 and got["params/cnn"] == 35000
    assert got["trained_accuracy/capsnet"] == 0.985 and got["trained_epochs/capsnet"] == 2.5
    columns = {"params": "params", "trained": "trained_accuracy", "clean %": "clean_accuracy",
               "composite %": "composite_accuracy", "FGSM 0.1 %": "fgsm_eps0.1_accuracy",
               "PGD 0.1 %": "pgd_eps0.1_accuracy",
               "AutoAttack 0.1 %": "autoattack_eps0.1_accuracy", "worst case 0.1 %": "worst_case_eps0.1_accuracy",
               "worst case 0.3 %": "worst_case_eps0.3_accuracy", "train img/s": "train_images_per_s",
               "inference img/s": "inference_images_per_s"}  # fmt: skip
    load_parts()  # the parts declare the headline's columns
    table = headline(run)
    assert set(columns) == set(table.columns) - {"run", "model", "device"}
    for row in table.to_dict("records"):
        for column, metric in columns.items():
            name = f"{metric}/{row['model']}"
            assert (row[column] != "–") == (name in got), name
            if name in got and column.endswith("%"):
                assert row[column].startswith(f"{100 * got[name]:.1f} "), name
    clean = run.tables["clean"].assign(accuracy=[0.98, 0.99, math.nan])
    assert "clean_accuracy/cnn" not in metrics(replace(run, tables={"clean": clean}))  # NaN is left out


# --- a real run folder and a real MLflow store ------------------------------------------------------


@pytest.mark.slow
def test_run_with_track_mlflow_logs_the_folder_it_wrote(run_folder, capsys):
    _, mlrun = only_run(f"sqlite:///{run_folder.parent / 'cli' / 'mlflow.db'}")
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == run_folder.name
    assert mlrun.data.tags["capsbench.run_folder"] == str(run_folder.resolve())


@pytest.mark.slow
def test_log_records_params_metrics_tags_and_artifacts(run_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an explicit SQLite store keeps its artifacts in ./mlruns (MLflow's default)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    line = open_tracker("mlflow", uri).log(run_folder, "throughput")
    client, mlrun = only_run(uri)
    assert mlrun.info.run_id in line and EXPERIMENT in line and "\n" not in line
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == run_folder.name
    run = read_run(run_folder, "R1")
    assert mlrun.data.params["train.steps"] == str(run.config["train"]["steps"])
    assert set(mlrun.data.params) == set(flatten(run.config))
    got = mlrun.data.metrics
    assert got == pytest.approx(metrics(run))
    assert {"params/capsnet", "train_images_per_s/capsnet", "inference_images_per_s/cnn-pooled"} <= set(got)
    tags = mlrun.data.tags
    assert tags["capsbench.suite"] == "throughput" and tags["capsbench.preset"] == "smoke"
    assert tags["capsbench.seeds"] == "0" and tags["capsbench.version"] == run.env["capsbench"]
    assert tags["capsbench.git_commit"] == run.env["git_commit"] and tags["capsbench.device"] == "cpu"
    assert tags["capsbench.run_folder"] == str(run_folder.resolve())
    files = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"summary.md", "report.md", "report.html", "config.toml", "env.json", "tables", "plots"} <= files
    assert "tables/throughput.csv" in {a.path for a in client.list_artifacts(mlrun.info.run_id, "tables")}


@pytest.mark.slow
def test_default_store_is_mlruns_in_the_working_directory(run_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = open_tracker("mlflow", None)
    assert not os.listdir(tmp_path)  # opening creates nothing
    tracker.log(run_folder, "throughput")
    assert os.listdir(tmp_path) == ["mlruns"]
    assert sorted(os.listdir(tmp_path / "mlruns")) == ["artifacts", "mlflow.db"]
    _, mlrun = only_run(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert (tmp_path / "mlruns" / "artifacts" / EXPERIMENT / mlrun.info.run_id / "artifacts" / "report.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("uri, fix", [("http://127.0.0.1:9", "check --track-uri, or that the server is up"),
                                      ("store", "set MLFLOW_ALLOW_FILE_STORE=true")])  # fmt: skip
def test_a_store_that_fails_is_a_one_line_error_and_the_folder_is_kept(run_folder, uri, fix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # port 9 refuses at once; no retry back-off
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(CapsbenchError) as e:
        open_tracker("mlflow", uri).log(run_folder, "throughput")
    message = str(e.value)
    assert "\n" not in message and f"the results are safe in {run_folder}" in message and fix in message
    assert (run_folder / "summary.md").is_file()


NO_SQLALCHEMY = """
import sys
sys.modules["sqlalchemy"] = None  # as with mlflow-skinny alone, which does not require SQLAlchemy
from pathlib import Path
from capsbench.run.track import open_tracker
try:
    open_tracker("mlflow", None).log(Path(sys.argv[1]), "throughput")
except Exception as e:
    print(type(e).__name__, e)
"""


@pytest.mark.slow
def test_a_database_store_without_sqlalchemy_says_to_install_mlflow(run_folder, tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_SQLALCHEMY, str(run_folder)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.stdout.startswith("CapsbenchError could not log to MLflow"), proc.stderr
    assert "needs the full MLflow package, not mlflow-skinny" in proc.stdout and proc.stdout.count("\n") == 1
