"""Command-line behaviour: help everywhere, one-line errors with exit code 2, nothing written."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from capsbench.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capsbench", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser: (), ("list",), ("data",), ("data", "info"), ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += subcommands(sub, (*prefix, name))
    return paths


COMMANDS = subcommands(build_parser())


def test_the_command_list_is_complete():
    assert {c[0] for c in COMMANDS if c} == {"list", "data", "train", "run", "report"}


@pytest.mark.parametrize("args", COMMANDS, ids=lambda c: " ".join(c) or "(top)")
def test_every_command_has_help(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_list_models_shows_exact_counts(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "8,215,568" in out and "35,445,522" in out and "8,206,090" in out


def test_list_suites_and_presets(capsys):
    assert main(["list", "suites"]) == 0
    out = capsys.readouterr().out
    for name in ("robustness", "affine", "adversarial", "throughput"):
        assert name in out
    assert main(["list", "presets"]) == 0
    assert "smoke" in capsys.readouterr().out


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


BAD_INPUT = [
    (["train", "capsule"], ["unknown model 'capsule'", "known models: capsnet, capsnet-attention"]),
    (["train", "capsnet", "--preset", "huge"], ["unknown preset 'huge'", "smoke"]),
    (["train", "capsnet", "--set", "train.stepz=3"], ["unknown key train.stepz", "steps"]),
    (["train", "capsnet", "--set", "train.steps=many"], ["train.steps: expected int", "many"]),
    (["train", "capsnet", "--set", "train.batch_size=0"], ["batch_size must be > 0"]),
    (["run", "nosuchsuite"], ["unknown suite 'nosuchsuite'", "robustness"]),
    (["run", "robustness", "--set", "colour=1"], ["unknown suite key 'colour'"]),
    (["run", "robustness", "--models", "capsnet,resnet"], ["unknown model 'resnet'"]),
    (["run", "robustness", "--set", "train.lr=-1"], ["lr must be > 0"]),
    (["run", "robustness", "--set", "train.amp=fp16"], ["train.amp must be one of auto, fp32, bf16"]),
    (["run", "robustness", "--seeds", "0,x"], ["--seeds takes comma-separated integers"]),
    (["run", "robustness", "--seed", "1", "--seeds", "0,1"], ["either --seed or --seeds"]),
    (["report", "/nonexistent/run"], ["is not a capsbench run folder"]),
    (["run", "adversarial", "--set", 'adversarial.losses=["hinge"]'], ["unknown attack loss 'hinge'", "ce, cw, dlr, margin"]),
    (["run", "adversarial", "--models", "cnn-pooled", "--set", 'adversarial.losses=["margin"]'],
     ["no model of this run (cnn-pooled)", "'margin' needs capsule lengths"]),
    (["run", "adversarial", "--set", "adversarial.apgd_steps=0"], ["adversarial.apgd_steps must be >= 1"]),
    (["run", "adversarial", "--set", "adversarial.apgd_restarts=-1"], ["adversarial.apgd_restarts must be >= 1"]),
    (["run", "adversarial", "--set", "adversarial.square_queries=0"], ["adversarial.square_queries must be >= 1"]),
    (["run", "adversarial", "--set", 'adversarial.aa_stages=["fab-t"]'], ["unknown attack 'fab-t'"]),
]


@pytest.mark.parametrize(("args", "needles"), BAD_INPUT)
def test_bad_input_in_process_returns_2_with_one_line(args, needles, tmp_path, capsys):
    """The fast tier's copy of the subprocess test below: same inputs, main() called directly."""
    argv = [*args, "--out", str(tmp_path / "out")] if args[0] == "run" else list(args)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and all(n in err[0] for n in needles), err
    assert not (tmp_path / "out").exists()


# Through a real process (exit status, stderr, no traceback): one input per command and kind of
# refusal; every input of BAD_INPUT goes through main() in the test above (the same code path
# from the argument parser on), at a fraction of a process start each.
THROUGH_A_PROCESS = [BAD_INPUT[i] for i in (0, 3, 5, 7, 12, 18)]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "needles"), THROUGH_A_PROCESS)
def test_bad_input_is_one_line_exit_2(args, needles, tmp_path):
    proc = run_cli(*args, "--out", str(tmp_path / "out")) if args[0] == "run" else run_cli(*args)
    _one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()  # refused before any work: nothing written


@pytest.mark.slow
def test_bad_suite_file_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [\n")
    _one_line_error(run_cli("run", str(bad)), "not valid TOML")
    bad.write_text('models = "capsnet"\nparts = ["affine"]\n')
    _one_line_error(run_cli("run", str(bad)), "models must be a non-empty list")


@pytest.mark.slow
def test_debug_shows_traceback():
    proc = run_cli("train", "capsule", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
