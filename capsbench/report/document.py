"""`python -m capsbench report RUN_DIR [RUN_DIR ...]`: report.md and a self-contained report.html
comparing models across suites and runs (headline table, claims, config differences, plots).

Both files are rendered from one list of blocks, so the Markdown and the HTML never disagree.
Every number carries its n and seeds; runs of a reduced preset are marked as not comparable.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from capsbench.core import atomic
from capsbench.data.datasets import DATASETS
from capsbench.report.folder import Run, read_run
from capsbench.report.format import markdown_table
from capsbench.report.headline import headline_notes, headline_row

REDUCED = "reduced protocol: not comparable to the paper"


# --- headline numbers --------------------------------------------------------------------


def param_count(run: Run, model: str) -> int | None:
    """``model``'s parameter count as a run's tables record it, or None."""
    for name in ("clean", "throughput"):
        df = run.tables.get(name)
        if df is not None and "params" in df.columns and (df.model == model).any():
            return int(df[df.model == model].params.iloc[0])
    return None


def _params(run: Run, model: str) -> str:
    n = param_count(run, model)
    return "–" if n is None else f"{n:,}"


def _trained(df: pd.DataFrame | None, model: str) -> str:
    """How well ``model`` was trained (tables/models.csv): accuracy at the end of training, epochs,
    convergence, and a mark when it is below its preset's accuracy floor."""
    if df is None or df.empty or not (df.model == model).any():
        return "–"
    cells = []
    for r in df[df.model == model].itertuples():
        floor = f"BELOW THE FLOOR {100 * r.floor:g}%; " if not r.meets_floor else ""
        conv = "converged" if r.converged else "not converged"
        cells.append(f"{floor}{100 * r.test_accuracy:.2f}% (n={int(r.test_n)}), {r.epochs:.2f} epochs, {conv}")
    return " | ".join(cells)


def headline(run: Run) -> pd.DataFrame:
    """One row per model: parameters, how it was trained, clean accuracy, every headline number of
    the parts the run ran (declared by each part: ``report/headline.py``), device."""
    t, parts = run.tables, list(run.config.get("parts", []))
    rows = []
    for m in run.config.get("models", []):
        row = {"run": run.label + run.mark, "model": m, "params": _params(run, m), "trained": _trained(t.get("models"), m)}
        rows.append({**row, **headline_row(t, m, parts), "device": run.env.get("device_name", "?")})
    return pd.DataFrame(rows)


# --- runs and their differences ----------------------------------------------------------------


def runs_table(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for r in runs:
        train = r.config.get("train", {})
        data = train.get("dataset", "mnist")  # runs from before train.dataset were all MNIST
        s = DATASETS.get(data).shape[1] if data in DATASETS else "?"
        proto = {"shift": f"{s}x{s}, ±{train.get('max_shift')} px shifts", "canvas": f"{train.get('canvas')}x{train.get('canvas')} canvas",
                 "none": f"{s}x{s}, no augmentation"}.get(train.get("augment"), "?")  # fmt: skip
        rows.append({
            "run": r.label + r.mark, "folder": str(r.folder), "suite": r.config.get("suite", "?"), "preset": r.preset,
            "training": f"{data}: {train.get('steps')} steps x {train.get('batch_size')}, {proto}",
            "seeds": ",".join(map(str, r.seeds)), "device": r.env.get("device_name", "?"),
            "torch": r.env.get("torch", "?"), "commit": str(r.env.get("git_commit", "?"))[:12],
            "started (UTC)": str(r.env.get("started_utc", "?"))[:19],
        })  # fmt: skip
    return pd.DataFrame(rows)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_differences(runs: list[Run]) -> pd.DataFrame:
    """The config keys whose values differ between runs (a missing key shows as '–')."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    missing = object()
    rows = []
    for k in keys:
        values = [f.get(k, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            rows.append({"key": k, **{r.label: ("–" if v is missing else str(v)) for r, v in zip(runs, values)}})
    return pd.DataFrame(rows)


# --- blocks -> Markdown / HTML ------------------------------------------------------------------


@dataclass
class Blocks:
    items: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, value: Any) -> None:
        self.items.append((kind, value))


def build(runs: list[Run]) -> Blocks:
    b = Blocks()
    b.add("h1", "capsbench report")
    b.add("p", f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from {len(runs)} run folder(s).")
    if any(r.reduced for r in runs):
        b.add("warn", f"† {REDUCED}. Runs marked † used preset "
              f"{', '.join(sorted({r.preset for r in runs if r.reduced}))}: shorter training, "
              "fewer test images; read them as a check of the machinery and of trends, not of the paper's numbers.")  # fmt: skip
    b.add("h2", "Runs")
    b.add("table", runs_table(runs))
    if len(runs) > 1:
        diff = config_differences(runs)
        b.add("h2", "Configuration differences")
        b.add("table", diff) if not diff.empty else b.add("p", "The runs' configurations are identical.")
    b.add("h2", "Headline")
    parts = list(dict.fromkeys(p for r in runs for p in r.config.get("parts", [])))
    b.add("p", "Accuracies in % with a 95% interval: a Wilson interval over the n test images for one seed, a "
          "t-interval over seeds for several (mean ± std). Trained: test accuracy at the end of training, epochs, the "
          "convergence rule (summary.md), and BELOW THE FLOOR where a model misses its preset's accuracy floor, "
          "so its numbers describe an under-trained model. " + headline_notes(parts))  # fmt: skip
    b.add("table", pd.concat([headline(r) for r in runs], ignore_index=True).fillna("–"))
    for r in (r for r in runs if r.claims is not None):
        b.add("h2", f"Paper claims ({r.label}{r.mark})")
        b.add("p", "Verdict rule: reproduced = the 95% interval lies inside the claim's band; not reproduced = "
              "interval and band are disjoint; inconclusive = they overlap; not run = no measurement.")  # fmt: skip
        b.add("table", r.claims)
    for r in runs:
        b.add("h2", f"Plots of {r.label}{r.mark}: {r.config.get('suite', '?')}, preset {r.preset}, seeds {','.join(map(str, r.seeds))}")
        b.add("p", f"Folder `{r.folder}`; its summary.md has every table.") if r.plots else b.add("p", "This run made no plots.")
        for p in r.plots:
            b.add("img", p)
    return b


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|")


def to_markdown(b: Blocks, out_dir: Path) -> str:
    out = []
    for kind, v in b.items:
        if kind in ("h1", "h2"):
            out += ["#" * int(kind[1]) + " " + v, ""]
        elif kind == "p":
            out += [v, ""]
        elif kind == "warn":
            out += [f"> **{v}**", ""]
        elif kind == "table":
            out += [markdown_table(v.map(_md_cell)), ""]
        elif kind == "img":
            rel = os.path.relpath(v, out_dir)
            out += [f"![{v.stem}]({Path(rel).as_posix()})", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.warn{background:#fff4d6;border-left:4px solid #e0a000;padding:.6em 1em}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}"""


def to_html(b: Blocks) -> str:
    """A single self-contained page: plots are embedded as base64 PNGs, no external files."""
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>capsbench report</title>", f"<style>{CSS}</style></head><body>"]
    for kind, v in b.items:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(v)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(v)}</p>")
        elif kind == "warn":
            out.append(f"<p class='warn'><strong>{html.escape(v)}</strong></p>")
        elif kind == "table":
            out.append(v.to_html(index=False, escape=True, na_rep="–", border=0))
        elif kind == "img":
            data = base64.b64encode(v.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(v.stem)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(v.name)}</figcaption></figure>")  # fmt: skip
    out.append("</body></html>")
    return "\n".join(out)


def write_report(run_dirs: list[str | Path], out_dir: str | Path,
                 shown_as: list[Path] | None = None) -> tuple[Path, Path]:  # fmt: skip
    """Render report.md and report.html for ``run_dirs`` into ``out_dir`` (files written atomically);
    ``shown_as``: the folders to name instead (a run writes its report while staging its folder)."""
    runs = [read_run(d, f"R{i + 1}") for i, d in enumerate(run_dirs)]
    for run, shown in zip(runs, shown_as or []):
        run.folder = Path(shown)
    out_dir = Path(out_dir)
    blocks = build(runs)
    md, page = out_dir / "report.md", out_dir / "report.html"
    atomic.write_text(md, to_markdown(blocks, out_dir))
    atomic.write_text(page, to_html(blocks))
    return md, page
