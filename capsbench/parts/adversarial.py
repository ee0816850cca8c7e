"""The adversarial part (registered as ``adversarial``): the attacks run in ``adversarial_run``,
the checks in ``adversarial_checks``, the tables, figures and summary in ``adversarial_report``."""

from __future__ import annotations

from capsbench.parts.adversarial_report import build_result, example_eps
from capsbench.parts.adversarial_run import (
    ADVERSARIAL_TABLES,
    AdversarialConfig,
    Evidence,
    autoattack,
    make_inputs,
    precheck,
    reconstructive,
    score_clean,
    sweep,
    worst_cases,
)
from capsbench.parts.base import PartResult, RunContext, part

__all__ = ["ADVERSARIAL_TABLES", "AdversarialConfig", "example_eps", "run_adversarial"]


@part("adversarial", AdversarialConfig, ADVERSARIAL_TABLES, precheck=precheck)
def run_adversarial(ctx: RunContext, cfg: AdversarialConfig) -> PartResult:
    data = make_inputs(ctx, cfg)
    ev = Evidence()
    score_clean(ctx, cfg, data, ev)
    sweep(ctx, cfg, data, ev)
    aa_eps = cfg.strong_eps
    for name, tm in ctx.models.items():
        if cfg.autoattack:
            for eps in aa_eps:
                autoattack(ctx, cfg, data, ev, name, eps)
        if cfg.detect and tm.model.reconstructs and name in ev.detectors:
            for eps in aa_eps:
                reconstructive(ctx, cfg, data, ev, name, eps)
    worst_cases(cfg, data, ev, list(ctx.models), [0.0] + aa_eps)
    return build_result(ctx, cfg, data, ev)
