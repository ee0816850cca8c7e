"""summary.md: what a researcher reads first in a run folder."""

from __future__ import annotations

from typing import Any

import pandas as pd

from capsbench.report.format import accuracy_cell, format_accuracy, markdown_table


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


def clean_section(clean: pd.DataFrame) -> list[str]:
    """Clean accuracy per model: Wilson intervals for one seed, plus a t-interval over seeds."""
    rows = []
    for model, g in clean.groupby("model", sort=False):
        row = {"model": model}
        if g.seed.nunique() > 1:
            row.update({f"seed {int(r.seed)}": format_accuracy(r.accuracy, int(r.n)) for r in g.itertuples()})
        row["accuracy [95% CI]"] = accuracy_cell([(float(r.accuracy), int(r.n)) for r in g.itertuples()])
        rows.append(row)
    method = ("Accuracy with a 95% Wilson interval over the n test images." if clean.seed.nunique() == 1
              else "Accuracy of each seed with its 95% Wilson interval over the n test images; the last column "
              "is the mean ± std over seeds with a 95% t-interval (clipped to [0, 100]).")  # fmt: skip
    return ["## Clean test accuracy", "", method, "", markdown_table(pd.DataFrame(rows)), ""]


def render_summary(r, env: dict[str, Any], runs: list[Any], tables: dict[str, pd.DataFrame],
                   claims: pd.DataFrame | None, files: list[str], wall: float) -> str:  # fmt: skip
    """The run's summary.md: protocol, models, clean accuracy, claims, each part's section (per
    seed), checks, files."""
    t = r.train
    seeds = [run.seed for run in runs]
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
        f"- seed{'s' if len(seeds) > 1 else ''}: {', '.join(map(str, seeds))}; device: {env['device_name']}; "
        f"torch {env['torch']}{', CUDA ' + str(env['cuda']) if env.get('cuda') else ''}; git commit {env['git_commit']}",
        f"- wall time: {wall:.0f} s; command: `{env['command']}`",
        "",
        "## Models",
        "",
        markdown_table(pd.concat([models_table(run.models).assign(seed=run.seed) for run in runs], ignore_index=True)),
        "",
    ]
    if "clean" in tables:
        out += clean_section(tables["clean"])
    if claims is not None:
        out += ["## Paper claims", "", "Verdicts by the rule in capsbench/report/claims.py; `claims.csv` has the same rows.", "",
                markdown_table(claims.astype(object).where(claims.notna(), "–")), ""]  # fmt: skip
    for run in runs:
        if len(runs) > 1:
            out += [f"## Seed {run.seed}", ""]
        out += [res.summary.strip() + "\n" for res in run.results.values() if res.summary]
    checks = [(run.seed, c) for run in runs for res in run.results.values() for c in res.checks]
    if checks:
        out += ["## Sanity checks", "", "| seed | check | result | numbers |", "|---|---|---|---|"]
        out += [f"| {s} | {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.detail} |" for s, c in checks]
        out += [""]
    out += ["## Files", "", "- `config.toml`: the resolved configuration", "- `env.json`: versions, device, commit, command",
            "- `report.md`, `report.html`: the report (headline table, plots embedded in the HTML)"]  # fmt: skip
    out += ["- `claims.csv`: the paper claims' verdicts"] if claims is not None else []
    out += [f"- `{f}`" for f in files]
    return "\n".join(out) + "\n"
