"""The adversarial part: white-box FGSM, targeted FGSM, PGD/BIM and random-sign noise over an
eps grid, transfer between models, and the sanity checks of Carlini et al. (2019)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.attacks import ATTACKS, PGD, Attack, SingleStep
from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.models import BenchModel
from capsbench.models.scoring import batch_predictions
from capsbench.parts.base import Check, PartResult, RunContext, part
from capsbench.parts.tally import Tally
from capsbench.report.format import checks_footer, markdown_table
from capsbench.report.plots import accuracy_lines, example_grid
from capsbench.report.stats import wilson_interval

WHITE_BOX = ("fgsm", "pgd", "noise")
TRANSFERRED = ("fgsm", "pgd")


@dataclass(frozen=True)
class AdversarialConfig:
    n: int = opt(1000, ge=1)  # test images (the first n of the run's test set)
    eps: list[float] = opt(factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5], ge=0, le=1, nonempty=True)
    pgd_steps: int = opt(10, ge=1)
    pgd_step_size: float = opt(0.0, ge=0)  # 0 = 2.5 * eps / steps (Madry et al.)
    pgd_n: int = opt(0, ge=0)  # images for the iterative attack (steps x dearer); 0 = n
    targeted: bool = True
    noise: bool = True
    transfer: bool = True
    examples: int = opt(6, ge=0)  # images in the example figure (0 = no figure)
    batch_size: int = opt(256, ge=1)

    def validate(self, where: str) -> None:
        if any(b <= a for a, b in zip(self.eps, self.eps[1:])):
            raise CapsbenchError(f"{where}.eps must be sorted ascending without repeats, got {self.eps}")
        if 0.0 not in self.eps:
            raise CapsbenchError(f"{where}.eps must include 0 for the eps=0 == clean check, got {self.eps}")
        if self.eps[-1] == 0:
            raise CapsbenchError(f"{where}.eps needs at least one value > 0 to attack with, got {self.eps}")

    def step_size(self, eps: float) -> float:
        return self.pgd_step_size or 2.5 * eps / self.pgd_steps


def make_attack(name: str, model: BenchModel, eps: float, cfg: AdversarialConfig, dtype: torch.dtype | None) -> Attack:
    if name == "pgd":
        return PGD(model, eps, dtype, cfg.batch_size, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size)
    return ATTACKS.get(name)(model, eps, dtype, cfg.batch_size)


def predictions(ctx: RunContext, models: dict, x: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Predicted class (N,) of each model on ``x`` (N, 1, S, S), in batches, under autocast."""
    return {name: batch_predictions(tm.model, x, batch_size, ctx.dtype) for name, tm in models.items()}


def count(tally: Tally, key: tuple, pred: Tensor, y: Tensor, target: Tensor | None = None) -> None:
    """Count under ``key`` = (model, attack, eps, source) the correct predictions ``pred`` (N,)
    and, for a targeted attack, those equal to ``target`` (device tensors, no sync)."""
    hits = {"hits": (pred == target).sum()} if target is not None else {}
    tally.put(key, len(y), correct=(pred == y).sum(), **hits)


def read_counts(tally: Tally) -> dict[tuple, tuple[int, int | None, int]]:
    """(correct, target hits or None, n) per key, read with one host sync."""
    got = tally.read()
    return {key: (c["correct"], c.get("hits"), got.n[key]) for key, c in got.values.items()}


@dataclass
class Inputs:
    """The evaluated images and labels; PGD (and its comparisons) use the first ``pgd_n``."""

    x: Tensor  # (n, 1, S, S) in [0, 1]
    y: Tensor  # (n,) true classes
    targets: Tensor  # (n,) random target != y, the same for every model
    pgd_n: int


def make_inputs(ctx: RunContext, cfg: AdversarialConfig) -> Inputs:
    n = min(cfg.n, len(ctx.test_x))
    y = ctx.test_y[:n]
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    offset = torch.randint(1, 10, (n,), device=ctx.device, generator=gen)  # 1..9: never the label
    return Inputs(ctx.test_inputs(ctx.test_x[:n]), y, (y + offset) % 10, min(cfg.pgd_n or n, n))


def attack_list(cfg: AdversarialConfig) -> list[str]:
    return ["fgsm", "pgd"] + (["noise"] if cfg.noise else []) + (["fgsm-targeted"] if cfg.targeted else [])


def run_attacks(ctx: RunContext, cfg: AdversarialConfig, data: Inputs) -> Tally:
    """Every attack at every eps on every model; crafted FGSM/PGD examples are scored on all
    models (transfer). Also counts each model's images with an all-zero input gradient."""
    tally = Tally()
    clean = predictions(ctx, ctx.models, data.x, cfg.batch_size)
    for name, p in clean.items():
        count(tally, (name, "clean", 0.0, name), p, data.y)
        count(tally, (name, "clean@pgd", 0.0, name), p[: data.pgd_n], data.y[: data.pgd_n])
    jobs = [(s, a, e) for s in ctx.models for a in attack_list(cfg) for e in cfg.eps]
    noise_gen = torch.Generator(device=ctx.device)
    directions: dict[tuple[str, str], Tensor] = {}  # single-step attacks: one gradient per eps sweep
    for source, attack, eps in tqdm(jobs, desc="adversarial", unit="attack", disable=not ctx.progress, file=sys.stderr):
        if attack == "noise" and eps == cfg.eps[0]:
            noise_gen.manual_seed(ctx.seed + 1)  # every model sees the same noise images
        run_job(ctx, cfg, data, tally, (source, attack, eps), noise_gen, directions)
    return tally


def run_job(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, tally: Tally, job: tuple[str, str, float],
            gen: torch.Generator, directions: dict[tuple[str, str], Tensor]) -> None:  # fmt: skip
    """One (source model, attack, eps): craft the examples, score them, count. A single-step
    attack's direction is computed at its first eps > 0 and reused for the others (the same
    images a fresh call would give, one gradient instead of one per eps)."""
    source, attack, eps = job
    k = data.pgd_n if attack == "pgd" else len(data.y)
    y, t = data.y[:k], data.targets[:k]
    atk = make_attack(attack, ctx.models[source].model, eps, cfg, ctx.dtype)
    labels = t if attack == "fgsm-targeted" else y
    if isinstance(atk, SingleStep) and eps > 0:
        if (source, attack) not in directions:
            directions[(source, attack)] = atk.direction(data.x[:k], labels)
        adv = atk.from_direction(data.x[:k], directions[(source, attack)])
    else:
        adv = atk(data.x[:k], labels, gen)
    if attack == "fgsm" and eps > 0 and (source, "zero-grad", 0.0, source) not in tally:
        tally.put((source, "zero-grad", 0.0, source), k, correct=atk.zero_grads)  # the gradient at x: any eps
    scored = ctx.models if (cfg.transfer and attack in TRANSFERRED) else {source: ctx.models[source]}
    preds = predictions(ctx, scored, adv, cfg.batch_size)  # at eps=0 too: the check must be able to fail
    for name, p in preds.items():
        count(tally, (name, attack, eps, source), p, y, t if attack == "fgsm-targeted" else None)
        if attack == "fgsm" and name == source:  # FGSM on PGD's images, for the PGD <= FGSM check
            count(tally, (name, "fgsm@pgd", eps, source), p[: data.pgd_n], y[: data.pgd_n])


def rows_from(counts: dict, cfg: AdversarialConfig, seed: int) -> pd.DataFrame:
    """The ``adversarial`` table: one row per (model, attack, eps, source_model)."""
    rows = []
    for (model, attack, eps, source), (c, hits, n) in counts.items():
        if attack not in ATTACKS:
            continue  # clean and the PGD-subset helper counts are not attack rows
        zero = counts.get((model, "zero-grad", 0.0, model)) if attack == "fgsm" and model == source else None
        rows.append({
            "model": model, "attack": attack, "eps": eps, "accuracy": c / n, "n": n, "source_model": source,
            "seed": seed, "target_success": hits / n if hits is not None else math.nan, "correct": c,
            "steps": {"pgd": cfg.pgd_steps, "noise": 0}.get(attack, 1),
            "step_size": cfg.step_size(eps) if attack == "pgd" else eps,
            "zero_grad_frac": zero[0] / zero[2] if zero else math.nan,
        })  # fmt: skip
    df = pd.DataFrame(rows, columns=ADVERSARIAL_TABLES["adversarial"])
    return df.sort_values(["model", "source_model", "attack", "eps"], ignore_index=True)


def clean_rows(counts: dict, models: dict, seed: int) -> pd.DataFrame:
    """Clean accuracy on the same n images (``adversarial_clean``)."""
    rows = []
    for m in models:
        c, _, n = counts[(m, "clean", 0.0, m)]
        rows.append({"model": m, "accuracy": c / n, "n": n, "seed": seed, "correct": c})
    return pd.DataFrame(rows, columns=ADVERSARIAL_TABLES["adversarial_clean"])


ADVERSARIAL_TABLES = {
    "adversarial": ("model", "attack", "eps", "accuracy", "n", "source_model", "seed", "target_success", "correct",
                    "steps", "step_size", "zero_grad_frac"),
    "adversarial_clean": ("model", "accuracy", "n", "seed", "correct"),
}


@part("adversarial", AdversarialConfig, ADVERSARIAL_TABLES)
def run_adversarial(ctx: RunContext, cfg: AdversarialConfig) -> PartResult:
    data = make_inputs(ctx, cfg)
    counts = read_counts(run_attacks(ctx, cfg, data))
    df = rows_from(counts, cfg, ctx.seed)
    clean = clean_rows(counts, ctx.models, ctx.seed)
    checks = sanity_checks(df, counts, list(ctx.models))
    figures = adversarial_figures(df, ctx, cfg, len(data.y))
    tables = {"adversarial": df, "adversarial_clean": clean}
    return PartResult(tables, figures, summary(df, clean, ctx, cfg, data, checks), checks)


# ---- checks -------------------------------------------------------------------------------


def _exceeds(a: float, b: float, n: int) -> bool:
    """Is accuracy ``a`` above ``b`` by more than noise: two standard errors sqrt(p(1-p)/n) of
    the pooled p = (a+b)/2, plus one example?"""
    p = (a + b) / 2
    return a > b + 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)) + 1 / max(n, 1)


def _pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def zero_eps_checks(df: pd.DataFrame, counts: dict, model: str) -> list[Check]:
    """eps = 0 must reproduce the clean count exactly, white-box and transferred."""
    checks = []
    for r in df[(df.model == model) & (df.eps == 0.0)].itertuples():
        ref = counts[(model, "clean" if r.n == counts[(model, "clean", 0.0, model)][2] else "clean@pgd", 0.0, model)][0]
        how = r.attack if r.source_model == model else f"{r.attack} transferred from {r.source_model}"
        checks.append(Check(f"{model} {how}: eps=0 equals clean", bool(r.correct == ref),
                            f"{r.correct}/{r.n} vs clean {ref}/{r.n}"))  # fmt: skip
    return checks


def monotone_check(curve: pd.DataFrame, model: str, attack: str) -> Check:
    """Accuracy must not rise with eps by more than the noise tolerance."""
    pts = list(curve.itertuples())
    rises = [(a.eps, b.eps) for a, b in zip(pts, pts[1:]) if _exceeds(b.accuracy, a.accuracy, b.n)]
    detail = ", ".join(f"eps {r.eps:g}: {_pct(r.accuracy)}" for r in pts) + (f"; rises at {rises}" if rises else "")
    return Check(f"{model} {attack}: accuracy non-increasing in eps", not rises, f"{detail} (n={pts[0].n})")


def pgd_checks(pgd: pd.DataFrame, fgsm_same: dict[float, tuple[int, int]], fgsm: pd.DataFrame, model: str) -> list[Check]:
    """PGD must beat FGSM on the same images, and reach near 0 at the largest eps."""
    pairs = [(r.eps, r.accuracy, fgsm_same[r.eps][0] / r.n, r.n) for r in pgd.itertuples()]
    worse = [e for e, p, f, n in pairs if _exceeds(p, f, n)]
    detail = ", ".join(f"eps {e:g}: {_pct(p)} vs {_pct(f)}" for e, p, f, _ in pairs)
    last, flast = pgd.iloc[-1], fgsm.iloc[-1]
    return [
        Check(f"{model}: PGD <= FGSM at every eps (same {pgd.n.iloc[0]} images)", not worse,
              detail + (f"; PGD worse at eps {worse}" if worse else "")),
        Check(f"{model}: PGD accuracy near 0 (< 10%) at the largest eps", bool(last.accuracy < 0.10),
              f"eps {last.eps:g}: PGD {_pct(last.accuracy)} (n={last.n}), FGSM {_pct(flast.accuracy)} (n={flast.n})"),
    ]  # fmt: skip


def masking_check(fgsm: pd.DataFrame, model: str) -> Check:
    frac = float(fgsm.zero_grad_frac.dropna().iloc[0]) if fgsm.zero_grad_frac.notna().any() else 0.0
    return Check(f"{model}: input gradients are non-zero (no gradient masking)", frac < 0.01,
                 f"{_pct(frac)} of images have an all-zero input gradient of the attack loss (e.g. a saturated "
                 "margin loss); gradient attacks cannot move them, so their robustness may be masking")  # fmt: skip


def noise_check(noise: pd.DataFrame, fgsm: pd.DataFrame, model: str) -> Check:
    m = noise.merge(fgsm, on="eps", suffixes=("_noise", "_fgsm"))
    ok = not any(_exceeds(r.accuracy_fgsm, r.accuracy_noise, r.n_noise) for r in m.itertuples())
    return Check(f"{model}: random-sign noise hurts less than FGSM (informational)", ok,
                 ", ".join(f"eps {r.eps:g}: noise {_pct(r.accuracy_noise)} vs FGSM {_pct(r.accuracy_fgsm)}" for r in m.itertuples()))  # fmt: skip


def transfer_checks(df: pd.DataFrame, model: str) -> list[Check]:
    """Examples crafted on another model must not beat the white-box attack (Carlini et al.
    2019: if they do, the white-box gradient is uninformative, e.g. masked)."""
    checks = []
    for attack in TRANSFERRED:
        d = df[(df.model == model) & (df.attack == attack)]
        own = d[d.source_model == model].set_index("eps")
        for source in sorted(set(d.source_model) - {model}):
            tr = d[d.source_model == source].set_index("eps")
            worse = [e for e in own.index if _exceeds(own.accuracy[e], tr.accuracy[e], int(tr.n[e]))]
            detail = ", ".join(f"eps {e:g}: {_pct(own.accuracy[e])} vs {_pct(tr.accuracy[e])}" for e in own.index)
            checks.append(Check(f"{model} {attack}: white-box at least as strong as transfer from {source}", not worse,
                                detail + (f"; transfer stronger at eps {worse}" if worse else "")))  # fmt: skip
    return checks


def sanity_checks(df: pd.DataFrame, counts: dict, models: list[str]) -> list[Check]:
    """Carlini et al. (2019) checks per model, each with its numbers."""
    checks = []
    for model in models:
        wb = df[(df.model == model) & (df.source_model == model)]
        curve = {a: wb[wb.attack == a].sort_values("eps") for a in WHITE_BOX}
        checks += zero_eps_checks(df, counts, model)
        checks += [monotone_check(curve[a], model, a) for a in WHITE_BOX if not curve[a].empty]
        same = {e: counts[(model, "fgsm@pgd", e, model)][::2] for e in curve["fgsm"].eps}
        checks += pgd_checks(curve["pgd"], same, curve["fgsm"], model)
        checks.append(masking_check(curve["fgsm"], model))
        checks += transfer_checks(df, model)
        if not curve["noise"].empty:
            checks.append(noise_check(curve["noise"], curve["fgsm"], model))
    return checks


# ---- figures ------------------------------------------------------------------------------

EPS_LABEL = "eps (L-inf, pixel intensity on a 0-1 scale)"


def adversarial_figures(df: pd.DataFrame, ctx: RunContext, cfg: AdversarialConfig, n: int) -> dict:
    wb = df[(df.model == df.source_model) & df.attack.isin(WHITE_BOX)]
    pgd_n = int(wb[wb.attack == "pgd"].n.iloc[0])
    figs = {"adversarial_accuracy": accuracy_lines(
        wb, x="eps", hue="model", style="attack", xlabel=EPS_LABEL,
        title=f"White-box untargeted L-inf: FGSM, PGD ({cfg.pgd_steps} steps, n={pgd_n}), noise (n={n}); 95% Wilson bands",
    )}  # fmt: skip
    tg = df[(df.model == df.source_model) & (df.attack == "fgsm-targeted")]
    if not tg.empty:
        figs["adversarial_targeted"] = accuracy_lines(
            tg.assign(accuracy=tg.target_success), x="eps", hue="model", xlabel=EPS_LABEL,
            ylabel="classified as the target (%)", title=f"Targeted FGSM toward a random wrong class (n={n})",
        )  # fmt: skip
    if (df.model != df.source_model).any():
        figs["adversarial_transfer"] = transfer_figure(df)
    if cfg.examples:
        figs["adversarial_examples"] = examples_figure(ctx, cfg)
    return figs


def transfer_figure(df: pd.DataFrame):
    """Accuracy of each model on examples crafted on every model (own = white-box), FGSM and PGD."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, attack in zip(axes, TRANSFERRED):
        d = df[df.attack == attack]
        d = d.assign(crafted=["white-box" if m == s else f"crafted on {s}" for m, s in zip(d.model, d.source_model)])
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
    """Rows: clean, then FGSM and PGD crafted on each model; columns: test images; each cell
    titled with every model's prediction."""
    k = min(cfg.examples, len(ctx.test_x))
    eps = example_eps(list(cfg.eps))
    x, y = ctx.test_inputs(ctx.test_x[:k]), ctx.test_y[:k]
    rows = [("clean", x)]
    for source, tm in ctx.models.items():
        rows += [(f"{a.upper()} on {source}", make_attack(a, tm.model, eps, cfg, ctx.dtype)(x, y)) for a in TRANSFERRED]
    short = short_names(list(ctx.models))
    labels = []
    for _, imgs in rows:
        preds = {m: p.tolist() for m, p in predictions(ctx, ctx.models, imgs, cfg.batch_size).items()}
        labels.append([" / ".join(f"{short[m]} {p[j]}" for m, p in preds.items()) for j in range(k)])
    truth = " ".join(str(v) for v in y.tolist())
    return example_grid([r[1] for r in rows], [r[0] for r in rows], labels,
                        title=f"White-box examples at eps={eps:g} (L-inf), PGD {cfg.pgd_steps} steps; true labels: {truth}")  # fmt: skip


# ---- summary ------------------------------------------------------------------------------


def _ci(correct: int, n: int) -> str:
    lo, hi = wilson_interval(correct, n)
    return f"{100 * correct / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def eps_table(sub: pd.DataFrame, index: list[str], value: str = "correct") -> str:
    """Rows ``index``, one column per eps, cells 'acc% [lo, hi]' (95% Wilson)."""
    cells = sub.assign(cell=[_ci(int(c), int(n)) for c, n in zip(sub[value], sub.n)])
    piv = cells.pivot_table(index=index, columns="eps", values="cell", aggfunc="first")
    return markdown_table(piv.rename(columns=lambda e: f"eps={e:g}").reset_index())


def protocol_note(ctx: RunContext, cfg: AdversarialConfig, data: Inputs) -> str:
    losses = "; ".join(f"{name}: {tm.model.loss_name}" for name, tm in ctx.models.items())
    step = f"{cfg.pgd_step_size:g}" if cfg.pgd_step_size else "2.5 x eps / steps (Madry et al. 2018)"
    return (
        f"White-box, untargeted L-inf attacks on the first {len(data.y)} test images (PGD on the first "
        f"{data.pgd_n}), inputs in [0, 1] and clamped, models in eval mode, eps grid {list(cfg.eps)}. "
        f"Each model is attacked through its own training loss ({losses}), summed over the batch. "
        f"FGSM (Goodfellow et al. 2015): one step, no random start. PGD: {cfg.pgd_steps} steps of size {step}, "
        "no random start (i.e. BIM, Kurakin et al. 2017). Noise: x + eps * random signs. Targeted FGSM steps "
        "down the loss of a random wrong class (seeded, the same for every model). Robust accuracy is "
        "unconditional (correct on adversarial / all images). Cells: accuracy [95% Wilson interval]."
    )


def summary(df: pd.DataFrame, clean: pd.DataFrame, ctx: RunContext, cfg: AdversarialConfig, data: Inputs,
            checks: list[Check]) -> str:  # fmt: skip
    out = ["## Adversarial", "", protocol_note(ctx, cfg, data), ""]
    out += ["**Clean** accuracy on these images", "", markdown_table(
        clean.assign(accuracy=[_ci(c, n) for c, n in zip(clean.correct, clean.n)])[["model", "accuracy", "n"]]), ""]  # fmt: skip
    wb = df[df.model == df.source_model]
    for attack in WHITE_BOX:
        sub = wb[wb.attack == attack]
        if not sub.empty:
            out += [f"**{attack.upper()}** accuracy (n={sub.n.iloc[0]})", "", eps_table(sub, ["model"]), ""]
    tg = wb[wb.attack == "fgsm-targeted"]
    if not tg.empty:
        hits = tg.assign(hits=(tg.target_success * tg.n).round().astype(int))
        out += [f"**Targeted FGSM** success rate (prediction == target, n={tg.n.iloc[0]})", "",
                eps_table(hits, ["model"], "hits"), "", "**Targeted FGSM** accuracy", "", eps_table(tg, ["model"]), ""]  # fmt: skip
    tr = df[df.model != df.source_model]
    if not tr.empty:
        out += ["**Transfer**: accuracy of `model` on examples crafted on `source_model`", "",
                eps_table(tr, ["attack", "source_model", "model"]), ""]  # fmt: skip
    out += checks_footer(checks, " (details under Sanity checks)")
    return "\n".join(out) + "\n"
