"""The adversarial part: white-box FGSM, targeted FGSM, PGD/BIM and random-sign noise over an
eps grid, transfer between models, and the sanity checks of Carlini et al. (2019)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.attacks import ATTACKS, PGD
from capsbench.device import autocast
from capsbench.errors import CapsbenchError
from capsbench.models import predict
from capsbench.plots import accuracy_lines, example_grid
from capsbench.stats import format_accuracy
from capsbench.suites.base import PARTS, Check, PartResult, RunContext
from capsbench.summary import markdown_table

WHITE_BOX = ("fgsm", "pgd", "noise")


@dataclass(frozen=True)
class AdversarialConfig:
    n: int = 1000  # test images (the first n of the run's test set)
    eps: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5])
    pgd_steps: int = 10
    pgd_step_size: float = 0.0  # 0 = 2.5 * eps / steps (Madry et al.)
    pgd_n: int = 0  # images for the iterative attack; 0 = n
    targeted: bool = True
    noise: bool = True
    transfer: bool = True
    examples: int = 6  # images in the example figure
    batch_size: int = 256

    def validate(self, where: str) -> None:
        if any(not 0 <= e <= 1 for e in self.eps):
            raise CapsbenchError(f"{where}.eps values must be in [0, 1] (pixel units), got {self.eps}")
        if sorted(self.eps) != list(self.eps) or len(set(self.eps)) != len(self.eps) or 0.0 not in self.eps:
            raise CapsbenchError(f"{where}.eps must be strictly increasing and include 0 (for the eps=0 == clean check), got {self.eps}")
        for key in ("n", "pgd_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise CapsbenchError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")
        if self.pgd_step_size < 0 or self.pgd_n < 0 or self.examples < 0:
            raise CapsbenchError(f"{where}: pgd_step_size, pgd_n and examples must be >= 0")


class Counts:
    """Correct-prediction counts kept on the device, keyed by (model, attack, eps, source)."""

    def __init__(self, device: torch.device) -> None:
        self.correct: dict[tuple, Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.long, device=device))
        self.hits: dict[tuple, Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.long, device=device))
        self.n: dict[tuple, int] = defaultdict(int)
        self.zero_grad: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.long, device=device))

    def add(self, key: tuple, pred: Tensor, y: Tensor, target: Tensor | None = None) -> None:
        self.correct[key] += (pred == y).sum()
        if target is not None:
            self.hits[key] += (pred == target).sum()
        self.n[key] += len(y)


def predict_all(ctx: RunContext, x: Tensor, models: dict | None = None) -> dict[str, Tensor]:
    """Predictions of every model (or of ``models``) on ``x``."""
    with torch.no_grad(), autocast(ctx.device, ctx.dtype):
        return {name: predict(tm.model(x)) for name, tm in (models or ctx.models).items()}


def make_attack(name: str, model, eps: float, cfg: AdversarialConfig, dtype):
    if name == "pgd":
        return PGD(model, eps, dtype, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size)
    return ATTACKS.get(name)(model, eps, dtype)


def attack_batch(ctx: RunContext, cfg: AdversarialConfig, counts: Counts, x: Tensor, y: Tensor,
                 targets: Tensor, gen: torch.Generator, with_pgd: bool) -> None:  # fmt: skip
    """All attacks at every eps on one batch; crafted examples are scored on every model."""
    for name, p in predict_all(ctx, x).items():
        counts.add((name, "clean", 0.0, name), p, y)
        if with_pgd:  # clean counts on PGD's (smaller) image set, for its eps=0 check
            counts.add((name, "clean@pgd", 0.0, name), p, y)
    attacks = ["fgsm"] + (["pgd"] if with_pgd else []) + (["noise"] if cfg.noise else [])
    attacks += ["fgsm-targeted"] if cfg.targeted else []
    for source, tm in ctx.models.items():
        for attack in attacks:
            labels = targets if attack == "fgsm-targeted" else y
            first = True
            for eps in cfg.eps:
                atk = make_attack(attack, tm.model, eps, cfg, ctx.dtype)
                adv = atk(x, labels, gen)
                if attack == "fgsm" and eps > 0 and first:  # the gradient at x is the same for every eps
                    counts.zero_grad[source] += atk.zero_grads
                    first = False
                scored = ctx.models if (cfg.transfer and attack in ("fgsm", "pgd")) else {source: tm}
                preds = predict_all(ctx, adv, scored)
                for name, p in preds.items():
                    counts.add((name, attack, eps, source), p, y, targets if attack == "fgsm-targeted" else None)


def rows_from(counts: Counts, cfg: AdversarialConfig, seed: int) -> pd.DataFrame:
    rows = []
    for key, correct in counts.correct.items():
        model, attack, eps, source = key
        if attack == "clean@pgd":
            continue
        n = counts.n[key]
        c = int(correct.item())
        steps = {"pgd": cfg.pgd_steps, "noise": 0, "clean": 0}.get(attack, 1)
        step_size = (cfg.pgd_step_size or 2.5 * eps / cfg.pgd_steps) if attack == "pgd" else eps
        hits = int(counts.hits[key].item()) if attack == "fgsm-targeted" else None
        zero = int(counts.zero_grad[model].item()) / n if (attack == "fgsm" and model == source) else math.nan
        rows.append({
            "model": model, "attack": attack, "eps": eps, "accuracy": c / n, "n": n, "source_model": source,
            "seed": seed, "target_success": hits / n if hits is not None else math.nan, "correct": c,
            "steps": steps, "step_size": step_size, "zero_grad_frac": zero,
        })  # fmt: skip
    return pd.DataFrame(rows).sort_values(["model", "source_model", "attack", "eps"], ignore_index=True)


def run_adversarial(ctx: RunContext, cfg: AdversarialConfig) -> PartResult:
    n = min(cfg.n, len(ctx.test_x))
    pgd_n = min(cfg.pgd_n or n, n)
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    y_all = ctx.test_y[:n]
    offset = torch.randint(1, 10, (n,), device=ctx.device, generator=gen)
    targets_all = (y_all + offset) % 10  # a random target different from the label, same for every model
    counts = Counts(ctx.device)
    batches = range(0, n, cfg.batch_size)
    for i in tqdm(batches, desc="adversarial", unit="batch", disable=not ctx.progress):
        j = min(i + cfg.batch_size, n)
        x, y, t = ctx.test_inputs(ctx.test_x[i:j]), y_all[i:j], targets_all[i:j]
        if i < pgd_n:  # the iterative attack runs on the first pgd_n images only
            k = min(pgd_n - i, len(y))
            attack_batch(ctx, cfg, counts, x[:k], y[:k], t[:k], gen, with_pgd=True)
            if k < len(y):
                attack_batch(ctx, cfg, counts, x[k:], y[k:], t[k:], gen, with_pgd=False)
        else:
            attack_batch(ctx, cfg, counts, x, y, t, gen, with_pgd=False)
    df = rows_from(counts, cfg, ctx.seed)
    pgd_clean = {m: int(counts.correct[(m, "clean@pgd", 0.0, m)].item()) for m in ctx.models}
    checks = sanity_checks(df, ctx, cfg, pgd_clean)
    figures = adversarial_figures(df, ctx, cfg)
    return PartResult({"adversarial": df}, figures, summary(df, ctx, cfg, checks), checks)


def _tol(p: float, n: int) -> float:
    """Two standard errors plus one example: rises smaller than this are noise."""
    return 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)) + 1 / max(n, 1)


def sanity_checks(df: pd.DataFrame, ctx: RunContext, cfg: AdversarialConfig, pgd_clean: dict[str, int]) -> list[Check]:
    """Carlini et al. (2019) checks, each with its numbers; ``pgd_clean``: clean counts on PGD's images."""
    checks = []
    wb = df[df.model == df.source_model]
    for model in ctx.models:
        clean = wb[(wb.model == model) & (wb.attack == "clean")].iloc[0]
        curves = {a: wb[(wb.model == model) & (wb.attack == a)].sort_values("eps") for a in WHITE_BOX + ("fgsm-targeted",)}
        for attack, c in curves.items():
            if c.empty:
                continue
            zero = c[c.eps == 0.0].iloc[0]
            ref = int(clean.correct) if zero.n == clean.n else pgd_clean[model]
            checks.append(Check(f"{model} {attack}: eps=0 equals clean", bool(zero.correct == ref),
                                f"{zero.correct}/{zero.n} vs clean {ref}/{zero.n}"))  # fmt: skip
            if attack == "fgsm-targeted":
                continue
            rises = [(a, b) for a, b in zip(c.itertuples(), c.iloc[1:].itertuples()) if b.accuracy > a.accuracy + _tol(a.accuracy, b.n)]
            detail = ", ".join(f"{100 * r.accuracy:.1f}%" for r in c.itertuples())
            checks.append(Check(f"{model} {attack}: accuracy non-increasing in eps", not rises, f"eps {list(c.eps)}: {detail}"))
        pgd, fgsm = curves["pgd"], curves["fgsm"]
        if not pgd.empty:
            merged = pgd.merge(fgsm, on="eps", suffixes=("_pgd", "_fgsm"))
            worse = merged[merged.accuracy_pgd > merged.accuracy_fgsm + merged.apply(lambda r: _tol(r.accuracy_fgsm, r.n_pgd), axis=1)]
            checks.append(Check(f"{model}: PGD <= FGSM at every eps", worse.empty,
                                ", ".join(f"eps {r.eps}: {100 * r.accuracy_pgd:.1f}% vs {100 * r.accuracy_fgsm:.1f}%" for r in merged.itertuples())))  # fmt: skip
            last = pgd.iloc[-1]
            checks.append(Check(f"{model}: PGD accuracy near 0 at the largest eps", bool(last.accuracy < 0.10),
                                f"eps {last.eps}: {100 * last.accuracy:.1f}% (FGSM {100 * fgsm.iloc[-1].accuracy:.1f}%)"))  # fmt: skip
        zero = float(curves["fgsm"].zero_grad_frac.iloc[0])
        checks.append(Check(f"{model}: input gradients are non-zero (no gradient masking)", zero < 0.01,
                            f"{100 * zero:.1f}% of images have an all-zero input gradient of the attack loss; "
                            "single-step attacks cannot move them, so their robustness may be masking"))  # fmt: skip
        noise = curves["noise"]
        if not noise.empty:
            m = noise.merge(fgsm, on="eps", suffixes=("_noise", "_fgsm"))
            ok = bool((m.accuracy_noise + m.apply(lambda r: _tol(r.accuracy_fgsm, r.n_noise), axis=1) >= m.accuracy_fgsm).all())
            checks.append(Check(f"{model}: random-sign noise hurts less than FGSM", ok,
                                ", ".join(f"eps {r.eps}: noise {100 * r.accuracy_noise:.1f}% vs FGSM {100 * r.accuracy_fgsm:.1f}%" for r in m.itertuples())))  # fmt: skip
    return checks


def adversarial_figures(df: pd.DataFrame, ctx: RunContext, cfg: AdversarialConfig) -> dict:
    wb = df[(df.model == df.source_model) & df.attack.isin(WHITE_BOX)]
    figs = {"adversarial_accuracy": accuracy_lines(
        wb, x="eps", hue="model", style="attack", xlabel="eps (L-inf, pixel units in [0, 1])",
        title=f"White-box robust accuracy (n={cfg.n}, PGD {cfg.pgd_steps} steps)")}  # fmt: skip
    tg = df[(df.model == df.source_model) & (df.attack == "fgsm-targeted")]
    if not tg.empty:
        tg = tg.assign(accuracy=tg.target_success)
        figs["adversarial_targeted"] = accuracy_lines(tg, x="eps", hue="model", ylabel="target success rate (%)",
                                                      xlabel="eps (L-inf)", title="Targeted FGSM: classified as the random target")  # fmt: skip
    tr = df[df.attack.isin(("fgsm", "pgd")) & (df.model != df.source_model)]
    if not tr.empty:
        tr = tr.assign(model=tr.source_model + " -> " + tr.model)
        figs["adversarial_transfer"] = accuracy_lines(tr, x="eps", hue="model", style="attack", xlabel="eps (L-inf)",
                                                      title="Transfer: examples crafted on one model, scored on the other")  # fmt: skip
    if cfg.examples:
        figs["adversarial_examples"] = examples_figure(ctx, cfg)
    return figs


def examples_figure(ctx: RunContext, cfg: AdversarialConfig):
    """Clean / FGSM / PGD images (crafted on each model) with every model's prediction."""
    k = min(cfg.examples, len(ctx.test_x))
    eps = min(cfg.eps, key=lambda e: abs(e - 0.2))
    x, y = ctx.test_inputs(ctx.test_x[:k]), ctx.test_y[:k]
    rows = [("clean", x)]
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    for source, tm in ctx.models.items():
        for attack in ("fgsm", "pgd"):
            rows.append((f"{attack.upper()} on {source}", make_attack(attack, tm.model, eps, cfg, ctx.dtype)(x, y, gen)))
    short = {name: name.split("-")[0] for name in ctx.models}
    labels = []
    for _, imgs in rows:
        preds = predict_all(ctx, imgs)
        labels.append([" / ".join(f"{short[m]} {int(p[j])}" for m, p in preds.items()) for j in range(k)])
    return example_grid([r[1] for r in rows], [r[0] for r in rows], labels,
                        title=f"Adversarial examples at eps={eps} (true: {' '.join(str(int(v)) for v in y)})")  # fmt: skip


def summary(df: pd.DataFrame, ctx: RunContext, cfg: AdversarialConfig, checks: list[Check]) -> str:
    losses = "; ".join(f"{name}: {tm.model.loss_name}" for name, tm in ctx.models.items())
    step = f"{cfg.pgd_step_size}" if cfg.pgd_step_size else "2.5 x eps / steps"
    out = [
        "## Adversarial",
        "",
        f"White-box, untargeted L-inf attacks on the first {cfg.n} test images (PGD/BIM on the first "
        f"{cfg.pgd_n or cfg.n}), inputs in [0, 1] and clamped, models in eval mode. Each model is attacked "
        f"through its own training loss ({losses}). FGSM: one step, no random start. PGD: {cfg.pgd_steps} "
        f"steps of size {step}, no random start (BIM). Robust accuracy is unconditional (correct on "
        "adversarial / all images). Noise: uniform random signs of size eps. 95% Wilson intervals.",
        "",
    ]
    wb = df[df.model == df.source_model]
    for attack in ("fgsm", "pgd", "noise"):
        sub = wb[wb.attack == attack]
        if sub.empty:
            continue
        table = sub.pivot_table(index="model", columns="eps", values="accuracy", aggfunc="first")
        ns = sub.pivot_table(index="model", columns="eps", values="n", aggfunc="first")
        cells = pd.DataFrame({f"eps={e}": [format_accuracy(table.loc[m, e], int(ns.loc[m, e])) for m in table.index]
                              for e in table.columns}, index=table.index).reset_index()  # fmt: skip
        out += [f"**{attack.upper()}** accuracy", "", markdown_table(cells), ""]
    tg = wb[wb.attack == "fgsm-targeted"]
    if not tg.empty:
        piv = tg.pivot_table(index="model", columns="eps", values="target_success", aggfunc="first")
        out += ["**Targeted FGSM** success rate (prediction == random target)", "",
                markdown_table(piv.map(lambda v: f"{100 * v:.1f}%").rename(columns=lambda e: f"eps={e}").reset_index()), ""]  # fmt: skip
    tr = df[(df.model != df.source_model) & df.attack.isin(("fgsm", "pgd"))]
    if not tr.empty:
        piv = tr.pivot_table(index=["source_model", "model", "attack"], columns="eps", values="accuracy", aggfunc="first")
        out += ["**Transfer** accuracy of `model` on examples crafted on `source_model`", "",
                markdown_table(piv.map(lambda v: f"{100 * v:.1f}%").rename(columns=lambda e: f"eps={e}").reset_index()), ""]  # fmt: skip
    return "\n".join(out)


PARTS.register("adversarial")((AdversarialConfig, run_adversarial))
