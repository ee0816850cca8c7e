"""summary.md: what a researcher reads first in a run folder."""

from __future__ import annotations

from typing import Any

import pandas as pd

from capsbench.report.format import accuracy_cell, format_accuracy, markdown_table
from capsbench.report.headline import headline_notes, headline_row

PAPER_GRADE = 0.99  # a preset whose accuracy floor is at least this trains paper-grade models


def models_table(run: Any) -> pd.DataFrame:
    """One row per model of a seed: how well it was trained (tables/models.csv), or that the
    run's parts used untrained weights."""
    if run.record is None:
        return pd.DataFrame([{"model": name, "seed": run.seed, "params": f"{meta['params']:,}",
                              "weights": "untrained (these parts do not depend on them)"}
                             for name, meta in run.metas.items()])  # fmt: skip
    rows = []
    for r in run.record.itertuples():
        floor = "" if r.floor <= 0 else (f" (floor {100 * r.floor:g}%)" if r.meets_floor
                                         else f" **BELOW THE FLOOR {100 * r.floor:g}%**")  # fmt: skip
        rows.append({
            "model": r.model, "seed": r.seed, "params": f"{r.params:,}",
            "test accuracy [95% CI]": format_accuracy(r.test_accuracy, int(r.test_n)) + floor,
            "images seen": f"{r.images_seen:,}", "epochs": f"{r.epochs:.2f}", "schedule": r.schedule,
            "converged": ("yes: " if r.converged else "no: ") + r.convergence,
            "train time (s)": f"{r.train_seconds:.0f}", "from cache": "yes" if r.from_cache else "no", "cache key": r.key,
        })  # fmt: skip
    return pd.DataFrame(rows)


def models_section(runs: list[Any], rule: str) -> list[str]:
    return ["## Models", "", "How well each model was trained: its final test accuracy (on the training run's test "
            f"images) with a 95% Wilson interval, and the convergence rule: {rule}.", "",
            markdown_table(pd.concat([models_table(run) for run in runs], ignore_index=True)), ""]  # fmt: skip


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


def headline_section(models: list[str], parts: list[str], tables: dict[str, pd.DataFrame]) -> list[str]:
    """The headline numbers of every model: clean accuracy and each part's own (the report's columns)."""
    rows = [{"model": m, **headline_row(tables, m, parts)} for m in models]
    return ["## Headline", "", "Accuracies in % with a 95% interval (Wilson for one seed, t over seeds). "
            + headline_notes(parts), "", markdown_table(pd.DataFrame(rows)), ""]  # fmt: skip


def render_summary(r, env: dict[str, Any], runs: list[Any], tables: dict[str, pd.DataFrame],
                   claims: pd.DataFrame | None, files: list[str], wall: float) -> str:  # fmt: skip
    """The run's summary.md: protocol, models, clean accuracy, claims, each part's section (per
    seed), checks, files."""
    t = r.train
    seeds = [run.seed for run in runs]
    out = [f"# capsbench run: {r.name}", ""]
    if r.preset != "full" and t.paper_protocol:
        out += [f"> **Preset `{r.preset}` ({t.description}): the paper's training protocol. Each part's section says "
                "what it tests on (the affNIST-style composite set is not affNIST).**", ""]
    elif r.preset != "full" and t.floor >= PAPER_GRADE:
        out += [f"> **Preset `{r.preset}` ({t.description}): models trained to paper-grade accuracy (floor "
                f"{100 * t.floor:g}%, see Models) on a shorter schedule than the paper's, measured with reduced "
                "budgets (test images, attack steps: each part's section says which). Not the paper's protocol.**",
                ""]  # fmt: skip
    elif r.preset != "full":
        out += [f"> **Preset `{r.preset}`: a reduced protocol. These numbers are not comparable to the paper's.**", ""]
    side = t.input_size if t.augment != "canvas" else 28
    protocol = {"shift": f"{side}x{side} with random shifts up to {t.max_shift} px",
                "canvas": f"digits placed at random on a {t.canvas}x{t.canvas} canvas (tests: centred)",
                "none": f"{side}x{side}, no augmentation"}[t.augment]  # fmt: skip
    data = "" if t.dataset == "mnist" else f"; dataset: `{t.dataset}` (not MNIST)"
    out += [
        f"- suite: `{r.name}`: {r.description}",
        f"- preset: `{r.preset}`; training: {t.steps} steps x batch {t.batch_size}, {t.schedule_text()}; "
        f"protocol: {protocol}{data}",
        f"- seed{'s' if len(seeds) > 1 else ''}: {', '.join(map(str, seeds))}; device: {env['device_name']}; "
        f"torch {env['torch']}{', CUDA ' + str(env['cuda']) if env.get('cuda') else ''}; git commit {env['git_commit']}",
        f"- wall time: {wall:.0f} s; command: `{env['command']}`",
        "",
    ]
    out += models_section(runs, t.convergence_rule())
    out += headline_section(list(r.models), list(r.parts), tables)
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
