"""A researcher's own model, from a file (``FILE.py:NAME``) or an installed package's entry point:
loaded, checked, wrapped, keyed by its source's hash, refused with one line when broken."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from capsbench.cli import main
from capsbench.core.errors import CapsbenchError
from capsbench.models import MODELS, build_model, model_name, model_options, weight_options
from capsbench.models.user import UserCNN
from capsbench.suite import RunRequest, resolve
from capsbench.train.cache import cache_key
from capsbench.train.config import train_config

ROOT = Path(__file__).resolve().parent.parent

TINY = """
import torch
from torch import nn

from capsbench.models.base import ModelOutput
from capsbench.models.capsule import CapsuleModel


def build(input_size: int = 28, num_classes: int = 10, width: int = 8):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(16 * width, num_classes))


def seven():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 7))


def broken():
    raise RuntimeError("out of ideas")


def not_a_module():
    return 42


class Caps(CapsuleModel):
    def __init__(self, input_size: int = 28, num_classes: int = 10, decoder: bool = True):
        super().__init__()
        self.input_size, self.num_classes = input_size, num_classes
        self.fc = nn.Linear(input_size * input_size, num_classes * 4)
        if decoder:
            self.decoder = None  # no decoder, but said so

    def forward(self, x, y=None):
        caps = self.fc(x.flatten(1)).view(-1, self.num_classes, 4)  # (B, C, 4)
        n2 = (caps**2).sum(-1)
        return ModelOutput(n2 / (1 + n2), caps)  # squashed lengths (B, C)


def no_decoder():
    return Caps(decoder=False)


answer = 42
"""


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    """tiny.py in a fresh current folder; the models a test registers are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY)
    before = set(MODELS.names())
    yield tmp_path / "tiny.py"
    for name in set(MODELS.names()) - before:
        MODELS.remove(name)


def test_a_plain_module_is_wrapped_as_a_cnn(user_file):
    name = model_name("tiny.py:build")
    assert name == "tiny:build" and name in MODELS
    model = build_model(name, width=4)
    assert isinstance(model, UserCNN)
    assert model.num_params() == (1 * 4 * 9 + 4) + (16 * 4 * 10 + 10)
    out = model(torch.rand(3, 1, 28, 28))
    assert out.scores.shape == (3, 10) and not torch.isnan(out.scores).any()
    loss = model.objective(out, None, torch.arange(3))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.attack_loss(model(torch.rand(3, 1, 28, 28)), torch.arange(3)).shape == (3,)


def test_builder_keywords_are_options_and_a_capsule_model_is_used_as_is(user_file):
    name = model_name("tiny.py:build")
    assert model_options(name)["width"] == 8
    with pytest.raises(CapsbenchError, match="unknown key model tiny:build.depth"):
        model_options(name, depth=3)
    caps = build_model(model_name("tiny.py:Caps"), input_size=20)
    assert type(caps).__name__ == "Caps" and caps.input_size == 20


def test_the_cache_key_carries_the_file_hash_and_changes_with_the_file(user_file):
    cfg, cpu = train_config("smoke"), torch.device("cpu")
    name = model_name("tiny.py:build")
    opts = model_options(name, input_size=28)
    sha = hashlib.sha256(user_file.read_bytes()).hexdigest()
    assert weight_options(name, opts)["source_sha256"] == sha
    assert "source" not in weight_options(name, opts)  # where the file lies is not what it computes
    key = cache_key(name, opts, cfg, cpu)
    assert cache_key(name, model_options(name, input_size=28), cfg, cpu) == key
    user_file.write_text(TINY + "\n# an edit\n")
    assert model_name("tiny.py:build") == name  # registered again: a new model under the same name
    new = model_options(name, input_size=28)
    assert new["source_sha256"] != sha and cache_key(name, new, cfg, cpu) != key
    with pytest.raises(CapsbenchError, match="changed"):
        build_model(name, **opts)  # options recorded before the edit name the old file
    assert "source_sha256" not in weight_options("cnn-pooled", model_options("cnn-pooled"))


def test_another_process_registers_the_model_from_its_options(user_file):
    """A Ray task or torchrun rank meets the name first in build_model, with the run's options."""
    name = model_name("tiny.py:build")
    opts = model_options(name, input_size=28, width=2)
    MODELS.remove(name)
    assert isinstance(build_model(name, **opts), UserCNN) and name in MODELS


@pytest.mark.parametrize(("spec", "needles"), [
    ("tiny.py:seven", ["tiny:seven", "shape (2, 7)", "(B, 10)"]),
    ("tiny.py:no_decoder", ["CapsuleModel Caps lacks decoder"]),
    ("tiny.py:broken", ["tiny:broken", "RuntimeError: out of ideas"]),
    ("tiny.py:not_a_module", ["returned a value of type int, not an nn.Module"]),
    ("tiny.py:answer", ["'answer' is not callable"]),
    ("tiny.py:nope", ["has no 'nope'", "build"]),
    ("missing.py:build", ["missing.py not found"]),
    ("tiny.txt:build", ["not a .py file"]),
    ("tiny.py", ["names no builder", "FILE.py:NAME"]),
])  # fmt: skip
def test_a_broken_user_model_is_one_line_from_the_cli(user_file, spec, needles, capsys):
    (user_file.parent / "tiny.txt").write_text("")
    for argv in (["run", "adversarial", "--models", spec, "--out", "out"], ["train", spec]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
        assert all(n in err[0] for n in needles), err[0]
    assert not (user_file.parent / "out").exists()


def test_a_suite_file_names_a_user_model_by_its_path(user_file):
    raw = {"models": ["tiny.py:build", "cnn-pooled"], "parts": ["affine"], "model": {"tiny:build": {"width": 3}}}
    r = resolve(raw, "mine", RunRequest(suite="mine", preset="smoke", device="cpu"))
    assert list(r.models) == ["tiny:build", "cnn-pooled"]
    assert r.models["tiny:build"]["width"] == 3 and r.models["tiny:build"]["source"] == f"{user_file}:build"


def test_an_entry_point_is_found_lazily(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "tinyplug-0.1.dist-info").mkdir(parents=True)
    (site / "tinyplug").mkdir()
    (site / "tinyplug" / "__init__.py").write_text("")
    (site / "tinyplug" / "nets.py").write_text("from torch import nn\n\ndef make(num_classes: int = 10):\n"
                                               "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n")  # fmt: skip
    (site / "tinyplug-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    eps = "[capsbench.models]\ntiny-plug = tinyplug.nets:make\n"
    (site / "tinyplug-0.1.dist-info" / "entry_points.txt").write_text(eps)
    monkeypatch.syspath_prepend(str(site))
    assert "tiny-plug" not in MODELS  # nothing looked up until a name is missing
    try:
        assert isinstance(build_model("tiny-plug"), UserCNN)
        assert MODELS.meta("tiny-plug")["source"] == "entry point tinyplug.nets:make"
        opts = model_options("tiny-plug")
        assert opts["source_sha256"] == hashlib.sha256((site / "tinyplug" / "nets.py").read_bytes()).hexdigest()
        MODELS.remove("tiny-plug")  # another process: found again from the entry point, its options accepted
        assert isinstance(build_model("tiny-plug", **opts), UserCNN)
        assert model_name("tiny-plug") == "tiny-plug"
    finally:
        MODELS.remove("tiny-plug")
        for m in ("tinyplug", "tinyplug.nets"):
            sys.modules.pop(m, None)


@pytest.mark.slow  # a subprocess import
def test_importing_capsbench_reads_no_entry_points():
    code = textwrap.dedent("""
        import importlib.metadata as md
        real = md.entry_points
        def watched(**select):  # torch reads its own group at import; capsbench's must wait
            if select.get("group") == "capsbench.models":
                raise SystemExit("capsbench.models entry points read at import")
            return real(**select)
        md.entry_points = watched
        import capsbench, capsbench.models, capsbench.cli, capsbench.suite
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("suite", "extra"), [
    ("adversarial", []),  # a plain module: attacked through ce and dlr (margin needs capsule lengths)
    ("affine", []),
])  # fmt: skip
def test_run_a_suite_on_your_own_model(suite, extra, shared_cache, tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    cmd = [sys.executable, "-m", "capsbench", "run", suite, "--preset", "smoke", "--models", "tiny.py:build", *extra,
           "--device", "cpu", "--data-dir", str(shared_cache), "--out", "run", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = pd.read_csv(tmp_path / "run" / "tables" / f"{suite}.csv")
    assert set(df["model"]) == {"tiny:build"} and len(df) > 0
    clean = pd.read_csv(tmp_path / "run" / "tables" / "clean.csv")
    assert clean["model"].tolist() == ["tiny:build"]
