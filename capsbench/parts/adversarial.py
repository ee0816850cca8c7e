"""The adversarial part (registered as ``adversarial``): the attacks run in ``adversarial_run``,
the checks in ``adversarial_checks``, the tables, figures and summary in ``adversarial_report``."""

from __future__ import annotations

from capsbench.parts.adversarial_report import build_result, example_eps
from capsbench.parts.adversarial_run import (
    ADVERSARIAL_TABLES,
    AdversarialConfig,
    Evidence,
    make_inputs,
    precheck,
    score_clean,
    strong_attacks,
    sweep,
    worst_cases,
)
from capsbench.parts.base import PartResult, RunContext, part
from capsbench.report.headline import Headline

__all__ = ["ADVERSARIAL_TABLES", "AdversarialConfig", "example_eps", "run_adversarial"]


# CPU budgets for the reduced presets (full: the config's defaults, the reference's budget on 9,000
# images with 1,000 held out for the detector); suite files override what they need.
SIZING = {
    "smoke": dict(n=64, pgd_steps=2, eps=[0.0, 0.1, 0.3], examples=3, apgd_steps=4, apgd_targets=2,
                  square_queries=10, check_restarts=1, recon_steps=3, vote_steps=3, detect_val_n=64),
    "quick": dict(n=500, pgd_n=200, pgd_steps=5, eps=[0.0, 0.1, 0.3], batch_size=100, apgd_steps=20, apgd_targets=3,
                  square_queries=200, check_restarts=1, recon_steps=20, vote_steps=20, detect_val_n=500),
    "standard": dict(n=500, pgd_n=200, pgd_steps=10, eps=[0.0, 0.1, 0.2, 0.3], batch_size=250, apgd_steps=25,
                     apgd_targets=3, square_queries=300, check_restarts=1, recon_steps=20, vote_steps=20,
                     detect_val_n=1000),
    "full": dict(n=9000),
}  # fmt: skip
WHITE_BOX = ("FGSM and PGD (BIM: no random start) as the per-image worst case over the attack losses each model "
             "provides (margin, ce, dlr), white-box L-inf, eps in pixel units; AutoAttack standard (APGD-CE, APGD-T, "
             "Square; budget in the run's summary); worst case: an image is robust only if every attack and loss "
             "failed, the headline robust accuracy.")  # fmt: skip
HEADLINE = [
    Headline("FGSM 0.1 %", "fgsm_eps0.1_accuracy", "adversarial", {"attack": "fgsm", "loss": "any", "eps": 0.1},
             optional=("loss",), about=WHITE_BOX),
    Headline("PGD 0.1 %", "pgd_eps0.1_accuracy", "adversarial", {"attack": "pgd", "loss": "any", "eps": 0.1},
             optional=("loss",), about=WHITE_BOX),
    Headline("AutoAttack 0.1 %", "autoattack_eps0.1_accuracy", "adversarial", {"attack": "autoattack", "eps": 0.1},
             about=WHITE_BOX),
    Headline("worst case 0.1 %", "worst_case_eps0.1_accuracy", "adversarial",
             {"attack": "worst-case", "loss": "any", "eps": 0.1}, optional=("loss",), about=WHITE_BOX),
    Headline("worst case 0.3 %", "worst_case_eps0.3_accuracy", "adversarial",
             {"attack": "worst-case", "loss": "any", "eps": 0.3}, optional=("loss",), about=WHITE_BOX),
]  # fmt: skip


# Any dataset (its eps defaults are MNIST's conventions: set adversarial.eps for other data)
@part("adversarial", AdversarialConfig, ADVERSARIAL_TABLES, precheck=precheck, sizing=SIZING, headline=HEADLINE,
      datasets=None)
def run_adversarial(ctx: RunContext, cfg: AdversarialConfig) -> PartResult:
    data = make_inputs(ctx, cfg)
    ev = Evidence()
    score_clean(ctx, cfg, data, ev)
    sweep(ctx, cfg, data, ev)
    strong_attacks(ctx, cfg, data, ev)
    worst_cases(cfg, data, ev, list(ctx.models), [0.0] + cfg.strong_eps)
    return build_result(ctx, cfg, data, ev)
