"""The adversarial part's attack runs (the part itself: ``parts/adversarial.py``): white-box FGSM, targeted FGSM, PGD/BIM and random-sign noise over an
eps grid through every attack loss a model provides, AutoAttack's standard composition, the
class-conditional reconstruction detector and the reconstructive attack that evades it,
transfer between models, the per-image worst case over everything, and the sanity checks of
Carlini et al. (2019) and Croce & Hein (2020).

Tables (columns in ``ADVERSARIAL_TABLES``): ``adversarial`` (one row per model, attack, loss,
eps and source model; loss ``any`` = the per-image worst case over the losses, attack
``worst-case`` = over every attack and loss), ``adversarial_clean``, ``adversarial_autoattack``
(robust accuracy after each stage, cumulative), ``adversarial_detection``, ``adversarial_checks``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from capsbench.attacks import (
    APGD,
    ATTACKS,
    LOSSES,
    PGD,
    STANDARD,
    Attack,
    AutoAttack,
    Budget,
    ReconstructiveAttack,
    SingleStep,
    VoteAttack,
)
from capsbench.attacks.pgd import madry_step
from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.core.seeds import derive_seed
from capsbench.models import BenchModel
from capsbench.models.capsule import has_votes
from capsbench.models.scoring import batch_predictions
from capsbench.parts.base import RunContext
from capsbench.parts.detection import Detector, fit_detector, predict_and_error
from capsbench.parts.tally import Tally

SWEPT = ("fgsm", "pgd", "noise", "fgsm-targeted")  # attacks run at every eps
TRANSFERRED = ("fgsm", "pgd")
LOSS_FREE = ("noise",)  # its images do not depend on a loss
ANY, STANDARD_LOSS = "any", "standard"  # the loss column of per-image worst cases and AutoAttack rows


@dataclass(frozen=True)
class AdversarialConfig:
    n: int = opt(1000, ge=1)  # test images (the first n of the run's test set)
    eps: list[float] = opt(factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5], ge=0, le=1, nonempty=True)
    # Losses FGSM, targeted FGSM and PGD climb; each model is attacked through those it provides
    # (margin: capsule models only). The worst case per image is taken over all of them.
    losses: list[str] = opt(factory=lambda: ["margin", "ce", "dlr"], nonempty=True)
    pgd_steps: int = opt(10, ge=1)
    pgd_step_size: float = opt(0.0, ge=0)  # 0 = 2.5 * eps / steps (Madry et al.)
    pgd_n: int = opt(0, ge=0)  # images for the iterative attacks, AutoAttack and the worst case; 0 = n
    targeted: bool = True
    noise: bool = True
    transfer: bool = True
    examples: int = opt(6, ge=0)  # images in the example figure (0 = no figure)
    batch_size: int = opt(256, ge=1)
    # AutoAttack standard (APGD-CE, APGD-T, Square in sequence), its checks, the reconstructive
    # attack and the worst case at `aa_eps` (each on the grid);
    # the reference's budget is 100 steps, 9 targets, 1 restart, 5,000 queries.
    autoattack: bool = True
    aa_eps: list[float] = opt(factory=list, gt=0, le=1)  # [] = 0.1 and 0.3 where on the grid, else the largest eps
    aa_stages: list[str] = opt(factory=lambda: list(STANDARD), nonempty=True)
    apgd_steps: int = opt(100, ge=1)
    apgd_targets: int = opt(9, ge=1, le=9)
    apgd_restarts: int = opt(1, ge=1)
    square_queries: int = opt(5000, ge=1)
    # Checks run after AutoAttack on the images it left: APGD-CE with twice the steps, and
    # `check_restarts` more APGD-CE runs from new random starts; each may lower robust accuracy
    # by at most `check_margin` (a fraction of the images, at least one image).
    check_steps: bool = True
    check_restarts: int = opt(2, ge=0)
    check_margin: float = opt(0.01, ge=0, le=1)
    # The reconstruction detector (models with a decoder): threshold at `detect_fpr` false
    # positives on `detect_val_n` clean test images after the evaluated ones; the reconstructive
    # attack (PGD, `recon_steps` steps) at each aa_eps.
    detect: bool = True
    detect_fpr: float = opt(0.05, gt=0, lt=1)
    detect_val_n: int = opt(1000, ge=1)
    recon_steps: int = opt(50, ge=1)
    recon_weight: float = opt(10.0, ge=0, finite=True)
    # The vote attack (Gu et al. 2021) on capsule models with votes: PGD for `vote_steps` steps on
    # the uniform-vote surrogate, scored on the real model, at each aa_eps (in the worst case).
    vote: bool = True
    vote_steps: int = opt(100, ge=1)

    def validate(self, where: str) -> None:
        if any(b <= a for a, b in zip(self.eps, self.eps[1:])):
            raise CapsbenchError(f"{where}.eps must be sorted ascending without repeats, got {self.eps}")
        if 0.0 not in self.eps:
            raise CapsbenchError(f"{where}.eps must include 0 for the eps=0 == clean check, got {self.eps}")
        if self.eps[-1] == 0:
            raise CapsbenchError(f"{where}.eps needs at least one value > 0 to attack with, got {self.eps}")
        for name in self.losses:
            if name == "own":
                raise CapsbenchError(f"{where}.losses names losses (e.g. margin, ce); 'own' is not one")
            LOSSES.get(name)  # unknown: one line listing the known losses
        if len(set(self.losses)) < len(self.losses):
            raise CapsbenchError(f"{where}.losses lists a loss twice: {self.losses}")
        off_grid = [e for e in self.aa_eps if not any(abs(e - g) < 1e-9 for g in self.eps)]
        if off_grid:
            raise CapsbenchError(f"{where}.aa_eps must be values of {where}.eps {self.eps}; {off_grid} are not")
        for s in self.aa_stages:
            if s not in ("apgd-ce", "apgd-dlr", "apgd-t", "square"):
                raise CapsbenchError(f"unknown attack {s!r} in {where}.aa_stages; known: apgd-ce, apgd-dlr, apgd-t, square")

    @property
    def strong_eps(self) -> list[float]:
        """Where AutoAttack and the worst case run: ``aa_eps``, or 0.1 and 0.3 where on the grid,
        else the largest eps."""
        wanted = self.aa_eps or [0.1, 0.3]
        on_grid = [e for e in self.eps if e > 0 and any(abs(e - w) < 1e-9 for w in wanted)]
        return on_grid or [self.eps[-1]]

    def step_size(self, eps: float) -> float:
        return madry_step(eps, self.pgd_steps, self.pgd_step_size)

    @property
    def budget(self) -> Budget:
        return Budget(self.apgd_steps, self.apgd_targets, self.apgd_restarts, self.square_queries)


def precheck(cfg: AdversarialConfig, models: dict[str, BenchModel]) -> None:
    """Every loss a suite or --set lists must be provided by at least one model of the run; the
    default list is the losses each model provides (a run of CNNs alone: ce and dlr, no margin)."""
    if cfg.losses == AdversarialConfig().losses:
        return
    for name in cfg.losses:
        why = [LOSSES.get(name).unavailable(m) for m in models.values()]
        if why and all(why):
            raise CapsbenchError(f"adversarial.losses: no model of this run ({', '.join(models)}) can be attacked "
                                 f"through {name!r}: {why[0]}; remove it or add a model that provides it")  # fmt: skip


def losses_of(model: BenchModel, cfg: AdversarialConfig, attack: str) -> list[str]:
    """The losses ``attack`` runs through on ``model``: its applicable ones ("-" for noise)."""
    if attack in LOSS_FREE:
        return ["-"]
    return [name for name in cfg.losses if LOSSES.get(name).unavailable(model) is None]


@dataclass
class Inputs:
    """The evaluated images and labels; the iterative attacks use the first ``pgd_n``."""

    x: Tensor  # (n, 1, S, S) in [0, 1]
    y: Tensor  # (n,) true classes
    targets: Tensor  # (n,) random target != y, the same for every model
    pgd_n: int
    x_val: Tensor  # (v, 1, S, S) clean images after the evaluated ones (the detector's threshold)


def make_inputs(ctx: RunContext, cfg: AdversarialConfig) -> Inputs:
    n = min(cfg.n, len(ctx.test_x))
    y = ctx.test_y[:n]
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    k = ctx.num_classes
    offset = torch.randint(1, k, (n,), device=ctx.device, generator=gen)  # 1..k-1: never the label
    x_val = ctx.test_inputs(ctx.test_x[n : n + cfg.detect_val_n])
    return Inputs(ctx.test_inputs(ctx.test_x[:n]), y, (y + offset) % k, min(cfg.pgd_n or n, n), x_val)


@dataclass
class Evidence:
    """What the attacks found, on the device until the end: counts, each white-box attack's
    per-image correctness (for the worst cases), and reconstruction errors (for the detector)."""

    tally: Tally = field(default_factory=Tally)
    correct: dict[tuple, Tensor] = field(default_factory=dict)  # (model, attack, loss, eps) -> (k,) bool
    errors: dict[tuple, tuple[Tensor, Tensor]] = field(default_factory=dict)  # same key -> (err (k,), fooled (k,))
    clean_err: dict[str, Tensor] = field(default_factory=dict)  # model -> (n,) clean reconstruction errors
    clean_correct: dict[str, Tensor] = field(default_factory=dict)  # model -> (n,) bool, correct on x itself
    clean_pred: dict[str, Tensor] = field(default_factory=dict)  # model -> (n,) predictions on x itself
    detectors: dict[str, Detector] = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)  # AutoAttack rows: model, eps, stage, n, budget
    stage_tally: Tally = field(default_factory=Tally)  # their robust / fooled / clean counts, by row index


def count(ev: Evidence, key: tuple, pred: Tensor, y: Tensor, target: Tensor | None = None) -> None:
    """Count under ``key`` = (model, attack, loss, eps, source) the correct predictions ``pred`` (N,)
    and, for a targeted attack, those equal to ``target`` (device tensors, no sync)."""
    hits = {"hits": (pred == target).sum()} if target is not None else {}
    ev.tally.put(key, len(y), correct=(pred == y).sum(), **hits)


def make_attack(name: str, model: BenchModel, eps: float, cfg: AdversarialConfig, dtype: torch.dtype | None,
                loss: str = "own") -> Attack:  # fmt: skip
    loss_arg = None if loss == "-" else loss
    if name == "pgd":
        return PGD(model, eps, dtype, cfg.batch_size, loss_arg, steps=cfg.pgd_steps, step_size=cfg.pgd_step_size)
    return ATTACKS.get(name)(model, eps, dtype, cfg.batch_size, loss_arg)


def attack_list(cfg: AdversarialConfig) -> list[str]:
    return ["fgsm", "pgd"] + (["noise"] if cfg.noise else []) + (["fgsm-targeted"] if cfg.targeted else [])


ADVERSARIAL_TABLES = {
    "adversarial": ("model", "attack", "loss", "eps", "accuracy", "n", "source_model", "seed", "target_success",
                    "correct", "steps", "step_size", "zero_grad_frac"),
    "adversarial_clean": ("model", "accuracy", "n", "seed", "correct"),
    "adversarial_autoattack": ("model", "eps", "stage", "accuracy", "robust", "n", "fooled", "clean", "budget", "seed"),
    "adversarial_detection": ("model", "attack", "loss", "eps", "n", "fooled", "detected", "detection_rate",
                              "undetected", "undetected_rate", "auc", "threshold", "val_n", "val_fpr", "clean_fpr",
                              "seed"),
    "adversarial_checks": ("model", "check", "name", "passed", "detail", "seed"),
}

def score_clean(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence) -> None:
    """Clean counts (all n, and the first pgd_n), clean reconstruction errors and detectors."""
    for name, tm in ctx.models.items():
        pred, err = predict_and_error(tm.model, data.x, cfg.batch_size, ctx.dtype)
        count(ev, (name, "clean", "-", 0.0, name), pred, data.y)
        ev.clean_correct[name], ev.clean_pred[name] = pred == data.y, pred
        count(ev, (name, "clean@pgd", "-", 0.0, name), pred[: data.pgd_n], data.y[: data.pgd_n])
        if err is not None and cfg.detect and len(data.x_val) >= 20:
            ev.clean_err[name] = err
            ev.detectors[name] = fit_detector(tm.model, data.x_val, cfg.detect_fpr, cfg.batch_size, ctx.dtype)


def sweep(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence) -> None:
    """Every swept attack through every loss at every eps on every model; crafted FGSM/PGD
    examples are also scored on the other models (transfer)."""
    jobs = [(s, a, loss, e) for s, tm in ctx.models.items() for a in attack_list(cfg)
            for loss in losses_of(tm.model, cfg, a) for e in cfg.eps]  # fmt: skip
    noise_gen = torch.Generator(device=ctx.device)
    directions: dict[tuple[str, str, str], Tensor] = {}  # single-step attacks: one gradient per eps sweep
    for job in tqdm(jobs, desc="adversarial", unit="attack", disable=not ctx.progress, file=sys.stderr):
        if job[1] == "noise" and job[3] == cfg.eps[0]:
            noise_gen.manual_seed(ctx.seed + 1)  # every model sees the same noise images
        run_job(ctx, cfg, data, ev, job, noise_gen, directions)


def run_job(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence, job: tuple[str, str, str, float],
            gen: torch.Generator, directions: dict[tuple[str, str, str], Tensor]) -> None:  # fmt: skip
    """One (source model, attack, loss, eps): craft the examples, score them, count. A single-step
    attack's direction is computed at its first eps > 0 and reused for the others (the same
    images a fresh call would give, one gradient instead of one per eps)."""
    source, attack, loss, eps = job
    k = data.pgd_n if attack == "pgd" else len(data.y)
    x, y, t = data.x[:k], data.y[:k], (data.targets[:k] if attack == "fgsm-targeted" else None)
    atk = make_attack(attack, ctx.models[source].model, eps, cfg, ctx.dtype, loss)
    if isinstance(atk, SingleStep) and eps > 0:
        if (source, attack, loss) not in directions:
            directions[(source, attack, loss)] = atk.direction(x, y, t)
            if attack == "fgsm":  # the gradient at x: the masking diagnostic for any eps
                ev.tally.put((source, "zero-grad", loss, 0.0, source), k, correct=atk.zero_grads)
        adv = atk.from_direction(x, directions[(source, attack, loss)])
    else:
        adv = atk(x, y, gen, t)
    scored = ctx.models if (cfg.transfer and attack in TRANSFERRED) else {source: ctx.models[source]}
    for name in scored:  # at eps=0 too: the check must be able to fail (unless adv is x itself)
        pred, err = score(ctx, cfg, ev, name, adv, x)
        count(ev, (name, attack, loss, eps, source), pred, y, t)
        if name != source:
            continue
        ev.correct[(name, attack, loss, eps)] = pred == y
        if err is not None and name in ev.detectors:
            ev.errors[(name, attack, loss, eps)] = (err, pred != y)
        if attack == "fgsm":  # FGSM on PGD's images, for the PGD <= FGSM check
            count(ev, (name, "fgsm@pgd", loss, eps, source), pred[: data.pgd_n], y[: data.pgd_n])


def score(ctx: RunContext, cfg: AdversarialConfig, ev: Evidence, name: str, adv: Tensor,
          x: Tensor) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Predictions (k,) and reconstruction errors (k,) or None of model ``name`` on ``adv`` (k, 1, S, S).
    An attack that handed back its input ``x`` itself (eps = 0) gets the clean ones of
    ``score_clean``: the same forward on the same batches of the same images, computed once."""
    if adv is x:
        err = ev.clean_err.get(name)
        return ev.clean_pred[name][: len(x)], (err[: len(x)] if err is not None else None)
    return predict_and_error(ctx.models[name].model, adv, cfg.batch_size, ctx.dtype)


def autoattack(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence, name: str, eps: float,
               bar: StepBar | None = None) -> None:  # fmt: skip
    """AutoAttack standard on the first pgd_n images, then the convergence and restart checks on
    the images it left; one row per stage (robust accuracy cumulative)."""
    model, k = ctx.models[name].model, data.pgd_n
    x, y = data.x[:k], data.y[:k]
    gen = torch.Generator(device=ctx.device).manual_seed(derive_seed(ctx.seed, int(round(eps * 1000))))
    on_step = bar.stepper(f"{name} eps {eps:g}") if bar is not None else None
    out = AutoAttack(model, eps, cfg.budget, ctx.dtype, cfg.batch_size, tuple(cfg.aa_stages), on_step)(x, y, gen)
    robust = out.robust_after[cfg.aa_stages[-1]]
    stages = [(s, out.robust_after[s]) for s in cfg.aa_stages]
    ev.correct[(name, "autoattack", STANDARD_LOSS, eps)] = robust
    ev.tally.put((name, "autoattack", STANDARD_LOSS, eps, name), k, correct=robust.sum())
    if name in ev.detectors:
        _, err = predict_and_error(model, out.adv, cfg.batch_size, ctx.dtype)
        ev.errors[(name, "autoattack", STANDARD_LOSS, eps)] = (err, ~robust & out.clean)
    for stage, runs, steps in check_stages(cfg):
        robust = robust.clone()
        idx = robust.nonzero().squeeze(1)  # one host sync per check stage
        for _ in range(runs if len(idx) else 0):
            atk = APGD(model, eps, ctx.dtype, cfg.batch_size, "ce", steps=steps)
            atk.on_step = partial(on_step, stage) if on_step is not None else None
            adv = atk(x[idx], y[idx], gen)
            robust[idx] &= batch_predictions(model, adv, cfg.batch_size, ctx.dtype) == y[idx]
        stages.append((stage, robust))
        ev.correct[(name, stage, "ce", eps)] = robust
    budgets = {s: standard_budget(s, cfg.budget) for s in cfg.aa_stages}
    budgets.update({s: f"{runs} x {steps} steps" for s, runs, steps in check_stages(cfg)})
    before = out.clean
    for stage, after in stages:
        ev.stage_tally.put((len(ev.stages),), k, robust=after.sum(), fooled=(before & ~after).sum(), clean=out.clean.sum())
        ev.stages.append({"model": name, "eps": eps, "stage": stage, "n": k, "budget": budgets[stage]})
        before = after


def standard_budget(stage: str, b: Budget) -> str:
    """What a standard stage ran with, for the tables."""
    if stage == "apgd-t":
        return f"{b.steps} steps, {b.targets} targets"
    return f"{b.queries} queries" if stage == "square" else f"{b.steps} steps, {b.restarts} restart(s)"


def check_stages(cfg: AdversarialConfig) -> list[tuple[str, int, int]]:
    """(stage name, APGD-CE runs, steps per run) of the checks after AutoAttack."""
    out = [("apgd-ce 2x steps", 1, 2 * cfg.apgd_steps)] if cfg.check_steps else []
    return out + ([(f"apgd-ce +{cfg.check_restarts} restarts", cfg.check_restarts, cfg.apgd_steps)] if cfg.check_restarts else [])


def reconstructive(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence, name: str, eps: float,
                   bar: StepBar | None = None) -> None:  # fmt: skip
    """The reconstructive attack against this model's detector, on the first pgd_n images."""
    model, k = ctx.models[name].model, data.pgd_n
    x, y = data.x[:k], data.y[:k]
    atk = ReconstructiveAttack(model, eps, ctx.dtype, cfg.batch_size, "ce", steps=cfg.recon_steps,
                               threshold=ev.detectors[name].threshold, weight=cfg.recon_weight)  # fmt: skip
    atk.on_step = partial(bar.stepper(f"{name} eps {eps:g}"), "reconstructive") if bar is not None else None
    adv = atk(x, y)
    pred, err = predict_and_error(model, adv, cfg.batch_size, ctx.dtype)
    count(ev, (name, "reconstructive", "ce", eps, name), pred, y)
    ev.correct[(name, "reconstructive", "ce", eps)] = pred == y
    ev.errors[(name, "reconstructive", "ce", eps)] = (err, pred != y)


def vote(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence, name: str, eps: float,
         bar: StepBar | None = None) -> None:  # fmt: skip
    """The vote attack (PGD on the uniform-vote surrogate) on the first pgd_n images, scored on
    the real model: its per-image correctness joins the worst case."""
    model, k = ctx.models[name].model, data.pgd_n
    x, y = data.x[:k], data.y[:k]
    atk = VoteAttack(model, eps, ctx.dtype, cfg.batch_size, "ce", steps=cfg.vote_steps)
    atk.on_step = partial(bar.stepper(f"{name} eps {eps:g}"), "vote") if bar is not None else None
    adv = atk(x, y)
    pred, err = predict_and_error(model, adv, cfg.batch_size, ctx.dtype)
    count(ev, (name, "vote", "ce", eps, name), pred, y)
    ev.correct[(name, "vote", "ce", eps)] = pred == y
    if err is not None and name in ev.detectors:
        ev.errors[(name, "vote", "ce", eps)] = (err, pred != y)


class StepBar:
    """The progress bar of the attacks after the sweep (AutoAttack, its checks, the reconstructive
    attack): one unit per gradient or query on a batch, ``planned`` per job. A job whose stages
    ran on fewer images (only those still robust: fewer batches, or none) jumps to its planned end."""

    def __init__(self, planned: list[int], enabled: bool) -> None:
        self.bar = tqdm(total=sum(planned), desc="adversarial: strong attacks", unit="step", disable=not enabled,
                        file=sys.stderr)  # fmt: skip
        self.end, self.what = 0, ""

    def stepper(self, job: str) -> Callable[[str], None]:
        """``step(stage)`` for the job ``job``: one unit, the bar showing what runs."""
        return lambda stage: self.step(f"adversarial: {job} {stage}")

    def step(self, what: str) -> None:
        if what != self.what:
            self.what = what
            self.bar.set_description_str(what, refresh=False)
        self.bar.update(1)

    def job_done(self, planned: int) -> None:
        self.end += planned
        self.bar.update(max(self.end - self.bar.n, 0))

    def close(self) -> None:
        self.bar.close()


def strong_jobs(ctx: RunContext, cfg: AdversarialConfig, ev: Evidence) -> list[tuple[str, str, float]]:
    """(attack, model, eps) of the runs after the sweep, in order: per model AutoAttack (and its
    checks) at each strong eps, then the reconstructive attack where the model has a detector, then
    the vote attack where it has votes."""
    jobs = []
    for name, tm in ctx.models.items():
        if cfg.autoattack:
            jobs += [("autoattack", name, eps) for eps in cfg.strong_eps]
        if cfg.detect and tm.model.reconstructs and name in ev.detectors:
            jobs += [("reconstructive", name, eps) for eps in cfg.strong_eps]
        if cfg.vote and has_votes(tm.model):
            jobs += [("vote", name, eps) for eps in cfg.strong_eps]
    return jobs


def planned_steps(cfg: AdversarialConfig, attack: str, batches: int) -> int:
    """Gradients and queries (each on one batch) that an ``attack`` job makes on ``batches``
    batches of images when every image stays robust (an APGD run: steps + 1; Square: queries + 1)."""
    if attack in ("reconstructive", "vote"):
        return batches * ((cfg.recon_steps if attack == "reconstructive" else cfg.vote_steps) + 1)
    b = cfg.budget
    per_stage = {"apgd-ce": b.restarts * (b.steps + 1), "apgd-dlr": b.restarts * (b.steps + 1),
                 "apgd-t": b.targets * b.restarts * (b.steps + 1), "square": b.queries + 1}  # fmt: skip
    checks = sum(runs * (steps + 1) for _, runs, steps in check_stages(cfg))
    return batches * (sum(per_stage[s] for s in cfg.aa_stages) + checks)


def strong_attacks(ctx: RunContext, cfg: AdversarialConfig, data: Inputs, ev: Evidence) -> None:
    """AutoAttack with its checks, the reconstructive attack and the vote attack, under one progress bar."""
    jobs = strong_jobs(ctx, cfg, ev)
    planned = [planned_steps(cfg, attack, math.ceil(data.pgd_n / cfg.batch_size)) for attack, _, _ in jobs]
    bar = StepBar(planned, ctx.progress)
    try:
        for (attack, name, eps), steps in zip(jobs, planned):
            run = {"autoattack": autoattack, "reconstructive": reconstructive, "vote": vote}[attack]
            run(ctx, cfg, data, ev, name, eps, bar)
            bar.job_done(steps)
    finally:
        bar.close()


def worst_cases(cfg: AdversarialConfig, data: Inputs, ev: Evidence, models: list[str], eps_list: list[float]) -> None:
    """Per image: robust under an attack only if every loss failed (loss ``any``), and robust at
    an eps only if it is correct on x itself and every attack and loss failed (``worst-case``, on
    the first pgd_n images: x is in its own eps-ball, so no attack can make a wrong image right)."""
    k = data.pgd_n
    by_attack: dict[tuple[str, str, float], list[Tensor]] = {}  # (model, attack, eps) -> per loss
    for (m, attack, _, eps), c in ev.correct.items():
        by_attack.setdefault((m, attack, eps), []).append(c)
    for (m, attack, eps), flags in by_attack.items():
        if attack in attack_list(cfg) and attack not in LOSS_FREE:
            both = torch.stack(flags).all(dim=0)
            ev.tally.put((m, attack, ANY, eps, m), len(both), correct=both.sum())
            if attack == "fgsm":  # on PGD's images, for the PGD <= FGSM check
                ev.tally.put((m, "fgsm@pgd", ANY, eps, m), k, correct=both[:k].sum())
    for m in models:
        for eps in eps_list:
            flags = [c[:k] for (m2, _, e2), cs in by_attack.items() if m2 == m and abs(e2 - eps) < 1e-9 for c in cs]
            if flags:
                worst = torch.stack(flags + [ev.clean_correct[m][:k]]).all(dim=0)
                ev.tally.put((m, "worst-case", ANY, eps, m), k, correct=worst.sum())
