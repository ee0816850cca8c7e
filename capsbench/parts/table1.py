"""The `table1` part: the paper's Table 1 (MNIST test error of the baseline CNN and of CapsNet
with 1 or 3 routing iterations, with and without reconstruction) and its parameter counts.

The variants are the claims registry's (capsbench/report/claims.toml, part = "table1"): each error
claim names a model and its options, trained under the run's preset with the paper's 2-px shift
augmentation and evaluated on the first ``test_n`` MNIST test digits (0 = all 10,000).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from capsbench.core.config import opt
from capsbench.core.errors import CapsbenchError
from capsbench.parts.base import PartResult, RunContext, part
from capsbench.report.format import format_accuracy, markdown_table
from capsbench.train.config import TrainConfig

# A model below CHANCE_FACTOR x chance accuracy did not train (e.g. its loss stuck at ln C): its
# error says nothing about the claim, which is then inconclusive rather than "not reproduced".
CHANCE_FACTOR = 2.0


@dataclass(frozen=True)
class Table1Config:
    claims: list[str] = opt(factory=list)  # table1 claim ids to measure; empty = all
    augment: Literal["shift", "none"] = "shift"  # the paper's MNIST protocol: shifts of up to 2 px, 28x28
    max_shift: int = opt(2, ge=0)
    test_n: int = opt(0, ge=0)  # 0 = the whole 10k test set, as in the paper
    batch_size: int = opt(500, ge=1)

    def validate(self, where: str) -> None:
        from capsbench.report.claims import load_claims

        known = [c.id for c in load_claims().values() if c.part == "table1"]
        bad = [c for c in self.claims if c not in known]
        if bad:
            raise CapsbenchError(f"{where}.claims: {bad[0]!r} is not a table1 claim; known: {', '.join(known)}")


def variants(cfg: Table1Config) -> list:
    from capsbench.report.claims import load_claims

    claims = [c for c in load_claims().values() if c.part == "table1"]
    return [c for c in claims if not cfg.claims or c.id in cfg.claims]


def param_rows(claims: list, seed: int) -> list[dict]:
    """Parameter counts of the claimed models at 28x28 (built, never trained)."""
    from capsbench.models import build_model

    rows = []
    for c in (c for c in claims if c.value == "params"):
        model = build_model(c.model, **{**c.options, "input_size": 28})
        rows.append({"claim": c.id, "model": c.model, "options": json.dumps(c.options, sort_keys=True),
                     "params": model.num_params(), "seed": seed})  # fmt: skip
    return rows


def claim_training(ctx: RunContext, cfg: Table1Config, claim) -> TrainConfig:
    """The training config of a claim's model: the run's, with the part's protocol and the claim's keys."""
    try:
        return dataclasses.replace(ctx.train_cfg, augment=cfg.augment, max_shift=cfg.max_shift, **claim.train)
    except TypeError:
        raise CapsbenchError(f"claim {claim.id}: train = {claim.train} names a key that is not a training key "
                             "(capsbench/report/claims.toml)") from None


def table1_jobs(ctx: RunContext, cfg: Table1Config) -> list[tuple[str, TrainConfig, dict]]:
    """The models the error claims train, for an executor to train before the part runs."""
    return [(c.model, claim_training(ctx, cfg, c), dict(c.options)) for c in variants(cfg) if c.value == "error"]


def error_row(ctx: RunContext, cfg: Table1Config, claim) -> dict:
    """Train (or fetch from the cache) the claim's model and measure its test error."""
    from capsbench.train.convergence import training_record
    from capsbench.train.tasks import evaluate, test_inputs

    if ctx.data is None:
        raise CapsbenchError("the table1 part needs the training set; run it through `python -m capsbench run`")
    train = claim_training(ctx, cfg, claim)
    tm = ctx.get_trained(claim.model, train, dict(claim.options))  # input size, channels, classes: the dataset's
    how = "cached" if tm.cached else f"trained in {tm.meta['train_seconds']:.0f}s"
    n = cfg.test_n or len(ctx.data.test_x)
    x, y = ctx.data.test_x[:n].to(ctx.device), ctx.data.test_y[:n].to(ctx.device)
    acc, n = evaluate(tm.model, x, y, lambda xb: test_inputs(train, xb), cfg.batch_size, ctx.dtype)
    print(f"  table1 {claim.id}: {claim.model} {how}, test error {100 * (1 - acc):.2f}% (n={n})", file=sys.stderr)
    rec = training_record(claim.model, tm.meta, train, len(ctx.data.train_x), ctx.seed, tm.cached)
    return {"claim": claim.id, "model": claim.model, "options": json.dumps(claim.options, sort_keys=True),
            "params": tm.meta["params"], "accuracy": acc, "error": 1 - acc, "n": n, "correct": round(acc * n),
            "seed": ctx.seed, "steps": tm.meta["steps"], **{k: rec[k] for k in TRAINING_COLUMNS}, "train_seconds": tm.meta["train_seconds"],
            "from_cache": tm.cached, "paper_error_pct": claim.paper_value,
            "train_failed": bool(acc < CHANCE_FACTOR / tm.model.num_classes)}  # fmt: skip


TRAINING_COLUMNS = ("dataset", "images_seen", "epochs", "converged", "convergence")  # of train/convergence.py's record
TABLE1_TABLES = {
    "table1": ("claim", "model", "options", "params", "accuracy", "error", "n", "correct", "seed", "steps",
               *TRAINING_COLUMNS, "train_seconds", "from_cache", "paper_error_pct", "train_failed"),
    "params": ("claim", "model", "options", "params", "seed"),
}


# Any dataset: the variants train on the run's data (the error claims require MNIST, claims.toml)
@part("table1", Table1Config, TABLE1_TABLES, needs_training=False, jobs=table1_jobs, datasets=None)
def run_table1(ctx: RunContext, cfg: Table1Config) -> PartResult:
    claims = variants(cfg)
    params = pd.DataFrame(param_rows(claims, ctx.seed), columns=TABLE1_TABLES["params"])
    errors = pd.DataFrame([error_row(ctx, cfg, c) for c in claims if c.value == "error"],
                          columns=TABLE1_TABLES["table1"])
    tables = {"params": params} if not params.empty else {}
    data = ctx.train_cfg.dataset
    lines = [f"## Table 1: {'MNIST' if data == 'mnist' else data} test error and parameter counts", ""]
    if not errors.empty:
        tables["table1"] = errors
        lines += [f"Each variant trained with shifts of up to {cfg.max_shift} px under the run's preset, tested on "
                  f"{int(errors.n.iloc[0])} {data} test images; accuracy with a 95% Wilson interval.", "",
                  markdown_table(pd.DataFrame([{"claim": r.claim, "model": r.model, "options": r.options,
                                                "test error %": f"{100 * r.error:.2f}", "paper %": r.paper_error_pct,
                                                "accuracy": format_accuracy(r.accuracy, int(r.n)), "steps": r.steps,
                                                "epochs": f"{r.epochs:.2f}",
                                                "trained": "NO (at chance)" if r.train_failed else "yes",
                                                "converged": ("yes: " if r.converged else "no: ") + r.convergence}
                                               for r in errors.itertuples()])), ""]  # fmt: skip
        failed = errors[errors.train_failed]
        if len(failed):
            lines += [f"**Training failed** for {', '.join(failed.claim)}: test accuracy below {CHANCE_FACTOR:g}x chance, "
                      "so these errors measure a model that did not learn, not the architecture; their claims are "
                      "marked inconclusive. Try another seed, more steps or a lower `train.lr`.", ""]  # fmt: skip
    if not params.empty:
        lines += ["Parameter counts at 28x28:", "", markdown_table(params.drop(columns="seed")), ""]
    return PartResult(tables=tables, summary="\n".join(lines))
