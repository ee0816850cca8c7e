"""The run-folder format, in one place: a new folder per run (never an existing one), tables as
``tables/<name>.csv``, figures as ``plots/<name>.png``, all written atomically; and ``read_run``,
which reads a folder back (config.toml, env.json, tables, plots, claims.csv)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from capsbench.core import atomic
from capsbench.core.errors import CapsbenchError


def check_out(out: str | None) -> None:
    """Refuse an existing non-empty --out (results are never overwritten), before any work."""
    if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise CapsbenchError(f"--out {out} already holds files; results are never overwritten, choose a new folder")


def new_run_folder(suite: str, out: str | None) -> Path:
    """A fresh folder; an existing non-empty --out is refused (results are never overwritten)."""
    if out:
        check_out(out)
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = Path("results") / suite
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / f"{stamp}-{secrets.token_hex(3)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


@contextlib.contextmanager
def staged(folder: Path, reserved: bool) -> Iterator[Path]:
    """Write a run folder out of sight: yield a hidden sibling (``.<name>.partial-<hex>``) that
    replaces ``folder`` (empty, as new_run_folder left it) in one rename when the block ends. A
    block that fails or is interrupted leaves nothing at ``folder``; ``reserved``: this run
    created ``folder``, so it goes too."""
    staging = folder.parent / f".{folder.name}.partial-{secrets.token_hex(3)}"
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, folder)  # POSIX: a directory may replace an empty one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if reserved:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def write_table(folder: Path, name: str, df) -> str:
    rel = f"tables/{name}.csv"
    atomic.write_with(folder / rel, lambda tmp: df.to_csv(tmp, index=False))
    return rel


def figure_png(fig) -> bytes:
    """A matplotlib figure as the PNG a run folder holds."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def write_png(folder: Path, name: str, data: bytes) -> str:
    rel = f"plots/{name}.png"
    atomic.write_bytes(folder / rel, data)
    return rel


def write_figure(folder: Path, name: str, fig) -> str:
    return write_png(folder, name, figure_png(fig))


@dataclass
class Run:
    """One run folder, read back: config, environment, tables, plots, claims."""

    folder: Path
    label: str  # R1, R2, ...
    config: dict[str, Any]
    env: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    plots: list[Path]
    claims: pd.DataFrame | None = None

    @property
    def preset(self) -> str:
        return str(self.config.get("preset", "?"))

    @property
    def seeds(self) -> list[int]:
        return list(self.config.get("seeds", [self.config.get("seed", 0)]))

    @property
    def reduced(self) -> bool:
        """Trained under a preset that is not the paper's protocol (full, canvas-stop)."""
        return self.preset != "full" and not self.config.get("train", {}).get("paper_protocol", False)

    @property
    def mark(self) -> str:
        return " †" if self.reduced else ""


def read_run(folder: str | Path, label: str) -> Run:
    """Read a run folder written by `run`; a folder that is not one gets a one-line error."""
    folder = Path(folder)
    if not (folder / "config.toml").is_file() or not (folder / "env.json").is_file():
        raise CapsbenchError(f"{folder} is not a capsbench run folder (no config.toml and env.json); "
                             "give folders written by `python -m capsbench run`")  # fmt: skip
    try:
        config = tomllib.loads((folder / "config.toml").read_text())
        env = json.loads((folder / "env.json").read_text())
        tables = {p.stem: pd.read_csv(p) for p in sorted((folder / "tables").glob("*.csv"))}
        claims = pd.read_csv(folder / "claims.csv") if (folder / "claims.csv").is_file() else None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise CapsbenchError(f"{folder} holds a corrupt file ({type(e).__name__}: {e}); rerun the suite") from None
    plots = sorted((folder / "plots").glob("*.png"))
    return Run(folder, label, config, env, tables, plots, claims)
