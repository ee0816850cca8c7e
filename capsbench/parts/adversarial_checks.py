"""The adversarial part's sanity checks (Carlini et al. 2019; Croce & Hein 2020), each with its
numbers and a key that claims can name: a failed ``eps0``, ``iterative``, ``near-zero``,
``transfer``, ``square``, ``convergence``, ``restarts``, ``worst`` or ``detector`` check makes a
claim that lists it inconclusive. Checks without a key are informational."""

from __future__ import annotations

import math

import pandas as pd

from capsbench.parts.adversarial_run import ANY
from capsbench.parts.base import Check


def exceeds(a: float, b: float, n: int) -> bool:
    """Is accuracy ``a`` above ``b`` by more than noise: two standard errors sqrt(p(1-p)/n) of
    the pooled p = (a+b)/2, plus one example?"""
    p = (a + b) / 2
    return a > b + 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)) + 1 / max(n, 1)


def pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def allowed_drop(margin: float, n: int) -> int:
    """Images a check stage may still fool: ``margin`` of n, at least one."""
    return max(1, math.floor(margin * n))


def zero_eps_checks(df: pd.DataFrame, counts: dict, model: str) -> list[Check]:
    """eps = 0 must reproduce the clean count exactly, white-box and transferred."""
    full = counts[(model, "clean", "-", 0.0, model)]
    checks = []
    for r in df[(df.model == model) & (df.eps == 0.0)].itertuples():
        ref = full[0] if r.n == full[2] else counts[(model, "clean@pgd", "-", 0.0, model)][0]
        how = f"{r.attack} ({r.loss})" if r.source_model == model else f"{r.attack} ({r.loss}) transferred from {r.source_model}"
        checks.append(Check(f"{model} {how}: eps=0 equals clean", bool(r.correct == ref),
                            f"{r.correct}/{r.n} vs clean {ref}/{r.n}", "eps0", model))  # fmt: skip
    return checks


def monotone_check(curve: pd.DataFrame, model: str, attack: str) -> Check:
    """Accuracy must not rise with eps by more than the noise tolerance."""
    pts = list(curve.itertuples())
    rises = [(a.eps, b.eps) for a, b in zip(pts, pts[1:]) if exceeds(b.accuracy, a.accuracy, b.n)]
    detail = ", ".join(f"eps {r.eps:g}: {pct(r.accuracy)}" for r in pts) + (f"; rises at {rises}" if rises else "")
    return Check(f"{model} {attack}: accuracy non-increasing in eps", not rises, f"{detail} (n={pts[0].n})", "monotone", model)


def pgd_checks(pgd: pd.DataFrame, fgsm_same: dict[float, tuple[int, int]], fgsm: pd.DataFrame, model: str) -> list[Check]:
    """PGD (worst over losses) must beat FGSM on the same images, and reach near 0 at the largest eps."""
    pairs = [(r.eps, r.accuracy, fgsm_same[r.eps][0] / r.n, r.n) for r in pgd.itertuples()]
    worse = [e for e, p, f, n in pairs if exceeds(p, f, n)]
    detail = ", ".join(f"eps {e:g}: {pct(p)} vs {pct(f)}" for e, p, f, _ in pairs)
    last, flast = pgd.iloc[-1], fgsm.iloc[-1]
    return [
        Check(f"{model}: PGD <= FGSM at every eps (same {pgd.n.iloc[0]} images, worst over losses)", not worse,
              detail + (f"; PGD worse at eps {worse}" if worse else ""), "iterative", model),
        Check(f"{model}: PGD accuracy near 0 (< 10%) at the largest eps", bool(last.accuracy < 0.10),
              f"eps {last.eps:g}: PGD {pct(last.accuracy)} (n={last.n}), FGSM {pct(flast.accuracy)} (n={flast.n})",
              "near-zero", model),
    ]  # fmt: skip


def masking_checks(df: pd.DataFrame, model: str) -> list[Check]:
    """Per loss: images whose input gradient is all zero (informational: the worst case over the
    losses and Square decide whether the model's robustness is masking)."""
    checks = []
    rows = df[(df.model == model) & (df.source_model == model) & (df.attack == "fgsm") & df.zero_grad_frac.notna()]
    for loss, r in rows.groupby("loss"):
        frac = float(r.zero_grad_frac.iloc[0])
        checks.append(Check(f"{model} {loss}: input gradients are non-zero (informational)", frac < 0.01,
                            f"{pct(frac)} of images have an all-zero input gradient of the {loss} loss; gradient "
                            "attacks through it cannot move them", "", model))  # fmt: skip
    return checks


def noise_check(noise: pd.DataFrame, fgsm: pd.DataFrame, model: str) -> Check:
    m = noise.merge(fgsm, on="eps", suffixes=("_noise", "_fgsm"))
    ok = not any(exceeds(r.accuracy_fgsm, r.accuracy_noise, r.n_noise) for r in m.itertuples())
    return Check(f"{model}: random-sign noise hurts less than FGSM (informational)", ok,
                 ", ".join(f"eps {r.eps:g}: noise {pct(r.accuracy_noise)} vs FGSM {pct(r.accuracy_fgsm)}" for r in m.itertuples()),
                 "", model)  # fmt: skip


def transfer_checks(df: pd.DataFrame, model: str) -> list[Check]:
    """Examples crafted on another model (through any of its losses) must not beat the white-box
    worst case over losses (Carlini et al. 2019: else the white-box gradient is uninformative)."""
    checks = []
    for attack in ("fgsm", "pgd"):
        d = df[(df.model == model) & (df.attack == attack)]
        own = d[(d.source_model == model) & (d.loss == ANY)].set_index("eps")
        for (source, loss), tr in d[d.source_model != model].groupby(["source_model", "loss"]):
            tr = tr.set_index("eps")
            worse = [e for e in own.index if e in tr.index and exceeds(own.accuracy[e], tr.accuracy[e], int(tr.n[e]))]
            detail = ", ".join(f"eps {e:g}: {pct(own.accuracy[e])} vs {pct(tr.accuracy[e])}" for e in own.index if e in tr.index)
            checks.append(Check(f"{model} {attack}: white-box at least as strong as transfer from {source} ({loss})",
                                not worse, detail + (f"; transfer stronger at eps {worse}" if worse else ""),
                                "transfer", model))  # fmt: skip
    return checks


STAGE_CHECKS = {  # stage -> (check key, what passing means)
    "square": ("square", "gradient-free Square fools no more than the margin after the gradient attacks (no masking)"),
    "2x steps": ("convergence", "twice the APGD steps fool no more than the margin (converged)"),
    "restarts": ("restarts", "more APGD restarts fool no more than the margin"),
}


def autoattack_checks(aa: pd.DataFrame, model: str, margin: float) -> list[Check]:
    """Per eps: the images Square, doubled steps and extra restarts fool after the earlier stages."""
    checks = []
    for r in aa[aa.model == model].itertuples():
        match = [(k, v) for k, v in STAGE_CHECKS.items() if r.stage == k or r.stage.endswith(k)]
        if not match:
            continue
        key, meaning = match[0][1]
        limit = allowed_drop(margin, int(r.n))
        checks.append(Check(f"{model} eps {r.eps:g}: {meaning}", int(r.fooled) <= limit,
                            f"{r.stage} fooled {r.fooled} more of {r.n} images (allowed {limit}); robust after it "
                            f"{pct(r.accuracy)}", key, model))  # fmt: skip
    return checks


def worst_checks(df: pd.DataFrame, model: str) -> list[Check]:
    """The per-image worst case is at most every attack measured on the same images."""
    wb = df[(df.model == model) & (df.source_model == model)]
    checks = []
    for w in wb[wb.attack == "worst-case"].itertuples():
        same = wb[(wb.eps == w.eps) & (wb.n == w.n) & (wb.attack != "worst-case")]
        above = same[same.correct < w.correct]
        checks.append(Check(f"{model} eps {w.eps:g}: worst case <= every attack on its {w.n} images", above.empty,
                            f"worst case {w.correct}/{w.n}; lowest single attack "
                            + (f"{same.correct.min()}/{w.n}" if len(same) else "none"), "worst", model))  # fmt: skip
    return checks


def detector_checks(det: pd.DataFrame, model: str, fpr: float) -> list[Check]:
    """The threshold set on validation images keeps about ``fpr`` false positives on the evaluated clean images."""
    d = det[det.model == model]
    if d.empty:
        return []
    r = d.iloc[0]
    n = int(r.n)
    ok = not exceeds(float(r.clean_fpr), fpr, n)
    return [Check(f"{model}: detector false positives on the evaluated clean images near {pct(fpr)}", ok,
                  f"{pct(r.clean_fpr)} of {n} clean images flagged (threshold {r.threshold:.3f} from {r.val_n} "
                  f"validation images, {pct(r.val_fpr)} there)", "detector", model)]  # fmt: skip


def sanity_checks(df: pd.DataFrame, counts: dict, aa: pd.DataFrame, det: pd.DataFrame, models: list[str],
                  margin: float, fpr: float) -> list[Check]:  # fmt: skip
    """Every check per model, each with its numbers."""
    checks = []
    for model in models:
        wb = df[(df.model == model) & (df.source_model == model)]
        curve = {a: wb[(wb.attack == a) & wb.loss.isin([ANY, "-"])].sort_values("eps") for a in ("fgsm", "pgd", "noise")}
        checks += zero_eps_checks(df, counts, model)
        checks += [monotone_check(c, model, a) for a, c in curve.items() if not c.empty]
        if not curve["pgd"].empty:
            same = {e: counts[(model, "fgsm@pgd", ANY, e, model)][::2] for e in curve["fgsm"].eps}
            checks += pgd_checks(curve["pgd"], same, curve["fgsm"], model)
        checks += masking_checks(df, model)
        checks += transfer_checks(df, model)
        if not curve["noise"].empty:
            checks.append(noise_check(curve["noise"], curve["fgsm"], model))
        checks += autoattack_checks(aa, model, margin)
        checks += worst_checks(df, model)
        checks += detector_checks(det, model, fpr)
    return checks
