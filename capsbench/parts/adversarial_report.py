"""The adversarial part's tables, figures and summary section, built from what the attacks found
(``adversarial.Evidence``) after one host read of every count."""

from __future__ import annotations

import math

import pandas as pd

from capsbench.attacks.pgd import madry_step
from capsbench.parts.adversarial_checks import pct, sanity_checks
from capsbench.parts.adversarial_run import (
    ADVERSARIAL_TABLES,
    ANY,
    TRANSFERRED,
    AdversarialConfig,
    Evidence,
    Inputs,
    make_attack,
)
from capsbench.parts.base import Check, PartResult, RunContext
from capsbench.parts.detection import detection_row, predict_and_error
from capsbench.report.format import checks_footer, interval_cell, markdown_table
from capsbench.report.plots import accuracy_lines, example_grid
from capsbench.report.stats import wilson_interval

HELPER_KEYS = ("clean", "clean@pgd", "zero-grad", "fgsm@pgd")  # counts that are not attack rows
EPS_LABEL = "eps (L-inf, pixel intensity on a 0-1 scale)"


def build_result(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence) -> PartResult:
    got = ev.tally.read()  # one host read for every count
    counts = {key: (c["correct"], c.get("hits"), got.n[key]) for key, c in got.values.items()}
    stages = ev.stage_tally.read().values
    df = rows_from(counts, cfg, ctx.seed)
    clean = clean_rows(counts, ctx.models, ctx.seed)
    aa = autoattack_rows(ev, stages, cfg, ctx.seed)
    det = detection_rows(ev, cfg, ctx.seed)
    checks = sanity_checks(df, counts, aa, det, list(ctx.models), cfg.check_margin, cfg.detect_fpr)
    tables = {"adversarial": df, "adversarial_clean": clean, "adversarial_autoattack": aa,
              "adversarial_detection": det, "adversarial_checks": checks_rows(checks, ctx.seed)}  # fmt: skip
    figures = adversarial_figures(df, det, ctx, cfg)
    return PartResult(tables, figures, summary(df, clean, aa, det, ctx, cfg, data, checks), checks)


# ---- tables -------------------------------------------------------------------------------


def steps_of(attack: str, cfg: AdversarialConfig) -> float:
    table = {"fgsm": 1, "fgsm-targeted": 1, "noise": 0, "pgd": cfg.pgd_steps, "autoattack": cfg.apgd_steps,
             "reconstructive": cfg.recon_steps, "vote": cfg.vote_steps}  # fmt: skip
    return table.get(attack, math.nan)


def step_size_of(attack: str, eps: float, cfg: AdversarialConfig) -> float:
    if attack == "pgd":
        return cfg.step_size(eps)
    if attack in ("reconstructive", "vote"):
        return madry_step(eps, cfg.recon_steps if attack == "reconstructive" else cfg.vote_steps)
    return eps if attack in ("fgsm", "fgsm-targeted", "noise") else math.nan


def rows_from(counts: dict, cfg: AdversarialConfig, seed: int) -> pd.DataFrame:
    """The ``adversarial`` table: one row per (model, attack, loss, eps, source_model)."""
    rows = []
    for (model, attack, loss, eps, source), (c, hits, n) in counts.items():
        if attack in HELPER_KEYS:
            continue
        zero = counts.get((model, "zero-grad", loss, 0.0, model)) if attack == "fgsm" and model == source else None
        rows.append({
            "model": model, "attack": attack, "loss": loss, "eps": eps, "accuracy": c / n, "n": n,
            "source_model": source, "seed": seed, "target_success": hits / n if hits is not None else math.nan,
            "correct": c, "steps": steps_of(attack, cfg), "step_size": step_size_of(attack, eps, cfg),
            "zero_grad_frac": zero[0] / zero[2] if zero else math.nan,
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=ADVERSARIAL_TABLES["adversarial"])
    return df.sort_values(["model", "source_model", "attack", "loss", "eps"], ignore_index=True)


def clean_rows(counts: dict, models: dict, seed: int) -> pd.DataFrame:
    """Clean accuracy on the same n images (``adversarial_clean``)."""
    rows = []
    for m in models:
        c, _, n = counts[(m, "clean", "-", 0.0, m)]
        rows.append({"model": m, "accuracy": c / n, "n": n, "seed": seed, "correct": c})
    return pd.DataFrame(rows, columns=ADVERSARIAL_TABLES["adversarial_clean"])


def autoattack_rows(ev: Evidence, counts: dict[tuple, dict], cfg: AdversarialConfig, seed: int) -> pd.DataFrame:
    rows = []
    for i, s in enumerate(ev.stages):
        c = counts[(i,)]
        rows.append({"model": s["model"], "eps": s["eps"], "stage": s["stage"], "accuracy": c["robust"] / s["n"],
                     "robust": c["robust"], "n": s["n"], "fooled": c["fooled"], "clean": c["clean"],
                     "budget": s["budget"], "seed": seed})  # fmt: skip
    return pd.DataFrame(rows, columns=ADVERSARIAL_TABLES["adversarial_autoattack"])


def detection_rows(ev: Evidence, cfg: AdversarialConfig, seed: int) -> pd.DataFrame:
    """The detector against every white-box attack of each reconstructing model (one host read)."""
    host = {key: (err.tolist(), fooled.tolist()) for key, (err, fooled) in ev.errors.items()}
    clean = {m: e.tolist() for m, e in ev.clean_err.items()}
    rows = []
    for (model, attack, loss, eps), (err, fooled) in sorted(host.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if eps == 0:
            continue
        row = detection_row(ev.detectors[model], clean[model][: len(err)], err, fooled)
        rows.append({"model": model, "attack": attack, "loss": loss, "eps": eps, **row, "seed": seed})
    df = pd.DataFrame(rows, columns=ADVERSARIAL_TABLES["adversarial_detection"])
    return df.sort_values(["model", "attack", "loss", "eps"], ignore_index=True)


def checks_rows(checks: list[Check], seed: int) -> pd.DataFrame:
    rows = [{"model": c.model, "check": c.key, "name": c.name, "passed": c.passed, "detail": c.detail, "seed": seed}
            for c in checks]  # fmt: skip
    return pd.DataFrame(rows, columns=ADVERSARIAL_TABLES["adversarial_checks"])


# ---- figures ------------------------------------------------------------------------------


def adversarial_figures(df: pd.DataFrame, det: pd.DataFrame, ctx: RunContext, cfg: AdversarialConfig) -> dict:
    wb = df[df.model == df.source_model]
    headline = wb[wb.attack.isin(["fgsm", "pgd", "noise"]) & wb.loss.isin([ANY, "-"])]
    figs = {"adversarial_accuracy": accuracy_lines(
        pd.concat([headline, wb[wb.attack.isin(["autoattack", "worst-case"])]]), x="eps", hue="model", style="attack",
        xlabel=EPS_LABEL, title=f"White-box untargeted L-inf, worst case over losses: FGSM, PGD ({cfg.pgd_steps} steps), "
        "noise, AutoAttack, and the worst case over everything; 95% Wilson bands",
    )}  # fmt: skip
    per_loss = wb[wb.attack.isin(TRANSFERRED)]
    if per_loss.loss.nunique() > 1:
        figs["adversarial_losses"] = losses_figure(per_loss)
    tg = wb[(wb.attack == "fgsm-targeted") & (wb.loss != ANY)]
    if not tg.empty:
        figs["adversarial_targeted"] = accuracy_lines(
            tg.assign(accuracy=tg.target_success), x="eps", hue="model", style="loss", xlabel=EPS_LABEL,
            ylabel="classified as the target (%)", title=f"Targeted FGSM toward a random wrong class (n={tg.n.iloc[0]})",
        )  # fmt: skip
    if (df.model != df.source_model).any():
        figs["adversarial_transfer"] = transfer_figure(df)
    if not det.empty:
        figs["adversarial_detection"] = accuracy_lines(
            det.assign(accuracy=det.detection_rate.fillna(0), n=det.fooled.clip(lower=1)), x="eps", hue="attack",
            style="loss", xlabel=EPS_LABEL, ylabel="successful examples detected (%)",
            title=f"Reconstruction-error detector at {pct(cfg.detect_fpr)} false positives ({', '.join(sorted(set(det.model)))})",
        )  # fmt: skip
    if cfg.examples:
        figs["adversarial_examples"] = examples_figure(ctx, cfg)
    return figs


def losses_figure(d: pd.DataFrame):
    """Accuracy under FGSM and PGD through each loss, one panel per (attack, model)."""
    from matplotlib.figure import Figure

    models = sorted(set(d.model))
    fig = Figure(figsize=(6 * len(models), 8))
    axes = fig.subplots(2, len(models), squeeze=False, sharey=True)
    for i, attack in enumerate(TRANSFERRED):
        for j, model in enumerate(models):
            sub = d[(d.attack == attack) & (d.model == model)]
            if not sub.empty:
                accuracy_lines(sub, x="eps", hue="loss", xlabel=EPS_LABEL, ax=axes[i][j],
                               title=f"{model}: {attack.upper()} by loss (n={sub.n.iloc[0]})")  # fmt: skip
    fig.suptitle("White-box accuracy by attack loss ('any' = per-image worst case over the losses); 95% Wilson bands")
    return fig


def transfer_figure(df: pd.DataFrame):
    """Accuracy of each model on examples crafted on every model (own = white-box), FGSM and PGD,
    worst case over the source's losses for white-box, each source loss for transfer."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, attack in zip(axes, TRANSFERRED):
        d = df[(df.attack == attack) & ((df.model != df.source_model) | (df.loss == ANY))]
        d = d.assign(crafted=["white-box (any loss)" if m == s else f"on {s} ({loss})"
                              for m, s, loss in zip(d.model, d.source_model, d.loss)])  # fmt: skip
        accuracy_lines(d, x="eps", hue="model", style="crafted", xlabel=EPS_LABEL, ax=ax,
                       title=f"{attack.upper()} (n={d.n.iloc[0]})")  # fmt: skip
    fig.suptitle("Accuracy on examples crafted on another model (transfer) vs on itself (white-box), "
                 "untargeted L-inf; 95% Wilson bands")
    return fig


def short_names(models: list[str]) -> dict[str, str]:
    """'capsnet' -> 'capsnet', 'cnn-pooled' -> 'cnn' when the prefixes stay unique."""
    short = {m: m.split("-")[0] for m in models}
    return short if len(set(short.values())) == len(models) else {m: m for m in models}


def example_eps(grid: list[float]) -> float:
    """0.2 if on the grid, else the non-zero grid value nearest 0.2."""
    nonzero = [e for e in grid if e > 0] or grid
    return min(nonzero, key=lambda e: abs(e - 0.2))


def examples_figure(ctx: RunContext, cfg: AdversarialConfig):
    """Rows: clean, then FGSM and PGD (each model's own loss) crafted on each model; columns: test
    images; each cell titled with every model's prediction."""
    k = min(cfg.examples, len(ctx.test_x))
    eps = example_eps(list(cfg.eps))
    x, y = ctx.test_inputs(ctx.test_x[:k]), ctx.test_y[:k]
    rows = [("clean", x)]
    for source, tm in ctx.models.items():
        rows += [(f"{a.upper()} on {source}", make_attack(a, tm.model, eps, cfg, ctx.dtype)(x, y)) for a in TRANSFERRED]
    short = short_names(list(ctx.models))
    labels = []
    for _, imgs in rows:
        preds = {m: predict_and_error(tm.model, imgs, cfg.batch_size, ctx.dtype)[0].tolist() for m, tm in ctx.models.items()}
        labels.append([" / ".join(f"{short[m]} {p[j]}" for m, p in preds.items()) for j in range(k)])
    truth = " ".join(str(v) for v in y.tolist())
    return example_grid([r[1] for r in rows], [r[0] for r in rows], labels,
                        title=f"White-box examples at eps={eps:g} (L-inf), each model's own loss, PGD {cfg.pgd_steps} "
                              f"steps; true labels: {truth}")  # fmt: skip


# ---- summary ------------------------------------------------------------------------------


def ci(correct: int, n: int) -> str:
    return interval_cell(correct / n, *wilson_interval(correct, n)) if n else "-"


def eps_table(sub: pd.DataFrame, index: list[str], value: str = "correct", n: str = "n") -> str:
    """Rows ``index``, one column per eps, cells 'acc% [lo, hi]' (95% Wilson)."""
    cells = sub.assign(cell=[ci(int(c), int(k)) for c, k in zip(sub[value], sub[n])])
    piv = cells.pivot_table(index=index, columns="eps", values="cell", aggfunc="first").fillna("-")
    return markdown_table(piv.rename(columns=lambda e: f"eps={e:g}").reset_index())


def protocol_note(ctx: RunContext, cfg: AdversarialConfig, data: Inputs) -> str:
    scores = "; ".join(f"{name}: {tm.model.score_name}" for name, tm in ctx.models.items())
    step = f"{cfg.pgd_step_size:g}" if cfg.pgd_step_size else "2.5 x eps / steps (Madry et al. 2018)"
    b = cfg.budget
    reference = b.steps == 100 and b.targets == 9 and b.queries == 5000
    return (
        f"White-box L-inf attacks on the first {len(data.y)} test images (iterative attacks, AutoAttack and the "
        f"worst case on the first {data.pgd_n}), inputs in [0, 1], models in eval mode, eps grid {list(cfg.eps)}. "
        f"Losses: {', '.join(cfg.losses)} (margin: CapsNet's training loss on capsule lengths; ce, dlr, cw on the "
        f"attack scores: {scores}); each model is attacked through every loss it provides, and `any` is the "
        "per-image worst case over them. FGSM: one step, no random start. PGD: "
        f"{cfg.pgd_steps} steps of size {step}, no random start (BIM). Noise: x + eps * random signs. Targeted FGSM "
        "steps toward a random wrong class (seeded, the same for every model). "
        f"AutoAttack standard (Croce & Hein 2020) at eps {cfg.strong_eps}: {' -> '.join(cfg.aa_stages)}, each on the "
        f"images still robust; {b.steps} APGD steps, {b.targets} APGD-T targets, {b.restarts} restart(s), "
        f"{b.queries} Square queries ({'the reference budget' if reference else 'REDUCED from the reference 100 steps, 9 targets, 5,000 queries'}); "
        "FAB-T left out. "
        + (f"Vote attack (Gu et al. 2021) on capsule models with votes: {cfg.vote_steps} PGD steps on the surrogate "
           "that averages the votes uniformly instead of routing, scored on the real model. " if cfg.vote else "")
        + "Worst case: an image counts as robust only if it is correct on the clean input and every attack and loss failed on it. "
        "Robust accuracy is unconditional (correct on adversarial / all images). Cells: accuracy [95% Wilson interval]."
    )


def summary(df: pd.DataFrame, clean: pd.DataFrame, aa: pd.DataFrame, det: pd.DataFrame, ctx: RunContext,
            cfg: AdversarialConfig, data: Inputs, checks: list[Check]) -> str:  # fmt: skip
    out = ["## Adversarial", "", protocol_note(ctx, cfg, data), ""]
    out += ["**Clean** accuracy on these images", "", markdown_table(
        clean.assign(accuracy=[ci(c, n) for c, n in zip(clean.correct, clean.n)])[["model", "accuracy", "n"]]), ""]  # fmt: skip
    wb = df[df.model == df.source_model]
    worst = wb[wb.attack == "worst-case"]
    if not worst.empty:
        out += [f"**Worst case** per image over every attack and loss (n={worst.n.iloc[0]}): the headline robust accuracy",
                "", eps_table(worst, ["model"]), ""]  # fmt: skip
    heads = wb[wb.attack.isin(["fgsm", "pgd", "fgsm-targeted", "autoattack", "reconstructive", "vote"]) | (wb.attack == "noise")]
    out += ["**Each attack and loss** (white-box accuracy)", "", eps_table(heads, ["attack", "loss", "model"]), ""]
    if not aa.empty:
        cells = aa.assign(accuracy=[ci(r, n) for r, n in zip(aa.robust, aa.n)])
        out += ["**AutoAttack** robust accuracy after each stage (cumulative), then the checks on what it left", "",
                markdown_table(cells[["model", "eps", "stage", "budget", "accuracy", "fooled"]]), ""]  # fmt: skip
    tg = wb[(wb.attack == "fgsm-targeted") & (wb.loss != ANY)]
    if not tg.empty:
        hits = tg.assign(hits=(tg.target_success * tg.n).round().astype(int))
        out += [f"**Targeted FGSM** success rate (prediction == target, n={tg.n.iloc[0]})", "",
                eps_table(hits, ["loss", "model"], "hits"), ""]  # fmt: skip
    if not det.empty:
        d = det.assign(detected=[ci(k, n) for k, n in zip(det.detected, det.fooled)],
                       undetected_success=[ci(k, n) for k, n in zip(det.undetected, det.n)], auc=det.auc.round(3))  # fmt: skip
        out += [f"**Reconstruction detector** (DARCCC) at {pct(cfg.detect_fpr)} false positives on "
                f"{det.val_n.iloc[0]} clean validation images: share of successful examples flagged, ROC AUC "
                "(clean vs successful adversarial), and the success rate left undetected; `reconstructive` is the "
                "adaptive attack of Qin et al. (2020) that keeps the reconstruction error under the threshold", "",
                markdown_table(d[["model", "attack", "loss", "eps", "fooled", "detected", "auc", "undetected_success"]]),
                ""]  # fmt: skip
    skipped = [m for m, tm in ctx.models.items() if cfg.detect and tm.model.reconstructs and m not in set(det.model)]
    if skipped:
        out += [f"**Reconstruction detector** not run for {', '.join(skipped)}: {len(data.x_val)} clean test images "
                f"after the {len(data.y)} evaluated ones, fewer than the 20 its threshold needs (lower adversarial.n "
                "or raise test_n)", ""]  # fmt: skip
    tr = df[df.model != df.source_model]
    if not tr.empty:
        out += ["**Transfer**: accuracy of `model` on examples crafted on `source_model` through `loss`", "",
                eps_table(tr, ["attack", "loss", "source_model", "model"]), ""]  # fmt: skip
    out += checks_footer(checks, " (details under Sanity checks)")
    return "\n".join(out) + "\n"
