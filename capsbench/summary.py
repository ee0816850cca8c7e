"""summary.md: what a researcher reads first in a run folder."""

from __future__ import annotations

from typing import Any

import pandas as pd

from capsbench.stats import format_accuracy


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no extra dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def models_table(models: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for name, tm in models.items():
        m = tm.meta
        if not m.get("trained", True):
            rows.append({"model": name, "params": f"{m['params']:,}", "weights": "untrained (these parts do not depend on them)"})
            continue
        rows.append({
            "model": name, "params": f"{m['params']:,}", "steps": m["steps"],
            "train time (s)": f"{m['train_seconds']:.0f}", "train img/s": f"{m['train_images_per_s']:.0f}",
            "from cache": "yes" if tm.cached else "no", "cache key": m["key"],
        })  # fmt: skip
    return pd.DataFrame(rows)


def render_summary(r, env: dict[str, Any], models: dict[str, Any], clean: pd.DataFrame | None,
                   results: dict[str, Any], files: list[str], wall: float) -> str:  # fmt: skip
    """The run's summary.md: protocol, models, clean accuracy, each part's section, checks, files."""
    t = r.train
    out = [f"# capsbench run: {r.name}", ""]
    if r.preset != "full":
        out += [f"> **Preset `{r.preset}`: a reduced protocol. These numbers are not comparable to the paper's.**", ""]
    protocol = {"shift": f"28x28 with random shifts up to {t.max_shift} px",
                "canvas": f"digits placed at random on a {t.canvas}x{t.canvas} canvas (tests: centred)",
                "none": "28x28, no augmentation"}[t.augment]  # fmt: skip
    out += [
        f"- suite: `{r.name}`: {r.description}",
        f"- preset: `{r.preset}`; training: {t.steps} steps x batch {t.batch_size}, Adam lr {t.lr} "
        f"(x{t.lr_decay} per {t.lr_decay_steps} steps), protocol: {protocol}",
        f"- seed: {t.seed}; device: {env['device_name']}; torch {env['torch']}"
        f"{', CUDA ' + str(env['cuda']) if env.get('cuda') else ''}; git commit {env['git_commit']}",
        f"- wall time: {wall:.0f} s; command: `{env['command']}`",
        "",
        "## Models",
        "",
        markdown_table(models_table(models)),
        "",
    ]
    if clean is not None:
        out += [
            "## Clean test accuracy",
            "",
            "Accuracy with a 95% Wilson interval over the n test images.",
            "",
            markdown_table(pd.DataFrame([
                {"model": row.model, "accuracy [95% CI]": format_accuracy(row.accuracy, int(row.n))}
                for row in clean.itertuples()
            ])),  # fmt: skip
            "",
        ]
    for res in results.values():
        if res.summary:
            out += [res.summary.strip(), ""]
    checks = [c for res in results.values() for c in res.checks]
    if checks:
        out += ["## Sanity checks", "", "| check | result | numbers |", "|---|---|---|"]
        out += [f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |" for c in checks]
        out += [""]
    out += ["## Files", "", "- `config.toml`: the resolved configuration", "- `env.json`: versions, device, commit, command"]
    out += [f"- `{f}`" for f in files]
    return "\n".join(out) + "\n"
