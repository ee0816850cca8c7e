"""A run folder appears whole or not at all (report/folder.py ``staged``): written in a hidden
sibling and renamed into place when the run ends; a failed or interrupted run leaves nothing."""

from __future__ import annotations

import dataclasses

import pytest

from capsbench.cli import main
from capsbench.core.errors import CapsbenchError
from capsbench.parts import load_parts
from capsbench.parts.base import PARTS
from capsbench.report.folder import new_run_folder, staged


def test_a_staged_folder_appears_whole_when_the_block_ends(tmp_path):
    folder = new_run_folder("x", str(tmp_path / "out"))
    with staged(folder, reserved=True) as work:
        (work / "a.txt").write_text("a")
        assert work.parent == tmp_path and work.name.startswith(".out.partial-")
        assert not any(folder.iterdir())  # nothing visible yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder became it
    assert (folder / "a.txt").read_text() == "a"


@pytest.mark.parametrize("reserved", [True, False])
def test_a_failed_block_leaves_nothing_it_made(tmp_path, reserved):
    out = tmp_path / "out"
    if not reserved:
        out.mkdir()  # an empty --out the user made: kept, still empty
    folder = new_run_folder("x", str(out))
    with pytest.raises(KeyboardInterrupt), staged(folder, reserved) as work:
        (work / "a.txt").write_text("a")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ([] if reserved else ["out"])
    assert reserved or not any(out.iterdir())


def test_a_run_that_fails_while_evaluating_leaves_no_folder(tmp_path, monkeypatch, fake_mnist, capsys):
    load_parts()

    def boom(ctx, cfg):
        raise CapsbenchError("the part failed")

    monkeypatch.setattr("capsbench.data.datasets.load_dataset", lambda *a, **k: fake_mnist)
    monkeypatch.setitem(PARTS._items, "throughput", dataclasses.replace(PARTS.get("throughput"), run=boom))
    out = tmp_path / "runs" / "out"
    argv = ["run", "throughput", "--preset", "smoke", "--device", "cpu", "--out", str(out), "--no-progress",
            "--data-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: the part failed"
    assert list((tmp_path / "runs").iterdir()) == []  # neither the folder nor its staging copy
