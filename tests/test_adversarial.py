"""The adversarial part: tables, checks, figures and summary on tiny trained models."""

from __future__ import annotations

import dataclasses
import re
from itertools import product
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from capsbench.core.config import from_dict
from capsbench.core.errors import CapsbenchError
from capsbench.models import BenchModel, build_model
from capsbench.parts.adversarial import AdversarialConfig, example_eps, run_adversarial
from capsbench.parts.adversarial_run import planned_steps
from capsbench.parts.base import PARTS, RunContext
from capsbench.train.config import TrainConfig
from tests.conftest import synthetic_digits
from tests.test_attacks import TINY_CAPS, data, faint, one_thread, train, trained_cnn  # noqa: F401 (fixtures)

# ---- the part ---------------------------------------------------------------------------


def fake_context(models: dict[str, BenchModel], n: int = 48) -> RunContext:
    vx, vy = synthetic_digits(n, 1)
    vx = faint(vx)
    return RunContext(
        models={k: SimpleNamespace(model=m, meta={"params": m.num_params(), "test_accuracy": 0.0}) for k, m in models.items()},
        test_x=vx, test_y=vy, train_cfg=TrainConfig(augment="none"), device=torch.device("cpu"),
        dtype=None, seed=0, progress=False,
    )  # fmt: skip


COLUMNS = ["model", "attack", "loss", "eps", "accuracy", "n", "source_model", "seed", "target_success", "correct", "steps",
           "step_size"]
SMALL = dict(n=40, pgd_n=24, eps=[0.0, 0.1, 0.3], pgd_steps=3, examples=3, batch_size=16, apgd_steps=4, apgd_targets=2,
             square_queries=10, check_restarts=1, recon_steps=3, detect_val_n=40)  # fmt: skip


@pytest.fixture(scope="module")
def caps_with_decoder(data):  # noqa: F811
    tx, ty, _, _ = data
    torch.manual_seed(0)
    return train(build_model("capsnet", **TINY_CAPS), tx, ty, steps=25, lr=1e-2)


@pytest.fixture(scope="module")
def part_result(trained_cnn, caps_with_decoder):  # noqa: F811
    ctx = fake_context({"capsnet": caps_with_decoder, "cnn-tiny": trained_cnn}, n=100)
    cfg = from_dict(AdversarialConfig, SMALL, "adversarial")
    return ctx, cfg, run_adversarial(ctx, cfg)


def test_part_tables_have_every_attack_and_loss(part_result):
    ctx, cfg, res = part_result
    p = PARTS.get("adversarial")
    assert (p.config, p.run) == (AdversarialConfig, run_adversarial)
    assert set(res.tables) == set(p.tables) and all(list(res.tables[t].columns) == list(c) for t, c in p.tables.items())
    df = res.tables["adversarial"]
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS and (df.seed == 0).all()
    wb = df[df.model == df.source_model]
    caps, cnn = wb[wb.model == "capsnet"], wb[wb.model == "cnn-tiny"]
    # margin is CapsNet's alone; every model gets ce and dlr, plus the per-image worst case `any`
    assert set(caps[caps.attack == "fgsm"].loss) == {"margin", "ce", "dlr", "any"}
    assert set(cnn[cnn.attack == "fgsm"].loss) == {"ce", "dlr", "any"}
    assert set(wb.attack) == {"fgsm", "pgd", "noise", "fgsm-targeted", "autoattack", "worst-case", "reconstructive",
                            "vote"}
    assert "reconstructive" not in set(cnn.attack)  # no decoder, no reconstructive attack
    assert "vote" not in set(cnn.attack)  # no votes, no vote attack
    assert set(wb[wb.attack.isin(["pgd", "autoattack", "worst-case", "reconstructive", "vote"])].n) == {24}
    assert set(wb[wb.attack.isin(["fgsm", "noise", "fgsm-targeted"])].n) == {40}
    assert set(wb[wb.attack == "worst-case"].eps) == {0.0, 0.1, 0.3}
    assert (df.correct == (df.accuracy * df.n).round()).all()
    tg = df[df.attack == "fgsm-targeted"]
    assert tg[tg.loss != "any"].target_success.notna().all() and tg[tg.loss == "any"].target_success.isna().all()
    # transfer rows carry the source's loss
    tr = df[df.model != df.source_model]
    assert set(tr[tr.model == "cnn-tiny"].loss) == {"margin", "ce", "dlr"} and set(tr.attack) == {"fgsm", "pgd"}


def test_worst_case_is_below_every_attack_and_any_below_every_loss(part_result):
    _, _, res = part_result
    df = res.tables["adversarial"]
    wb = df[df.model == df.source_model]
    for (model, eps), w in wb[wb.attack == "worst-case"].groupby(["model", "eps"]):
        same = wb[(wb.model == model) & (wb.eps == eps) & (wb.n == w.n.iloc[0]) & (wb.attack != "worst-case")]
        assert (w.correct.iloc[0] <= same.correct).all()
    for (model, attack, eps), g in wb[wb.attack.isin(["fgsm", "pgd"])].groupby(["model", "attack", "eps"]):
        assert (g[g.loss == "any"].correct.iloc[0] <= g[g.loss != "any"].correct).all()
    clean = res.tables["adversarial_clean"].set_index("model")
    zero = wb[(wb.eps == 0) & (wb.n == 40)]
    assert (zero.correct.values == clean.loc[zero.model, "correct"].values).all()


def test_autoattack_stages_are_cumulative(part_result):
    _, cfg, res = part_result
    aa = res.tables["adversarial_autoattack"]
    stages = ["apgd-ce", "apgd-t", "square", "apgd-ce 2x steps", "apgd-ce +1 restarts"]
    for (model, eps), g in aa.groupby(["model", "eps"]):
        assert list(g.stage) == stages
        robust = [g.clean.iloc[0]] + list(g.robust)
        assert all(b <= a for a, b in zip(robust, robust[1:]))
        assert list(g.fooled) == [a - b for a, b in zip(robust, robust[1:])]
    df = res.tables["adversarial"]
    aa_rows = df[df.attack == "autoattack"].set_index(["model", "eps"]).correct
    after_square = aa[aa.stage == "square"].set_index(["model", "eps"]).robust
    assert (aa_rows.sort_index() == after_square.sort_index()).all()
    assert "4 steps, 2 targets" in set(aa.budget) and "10 queries" in set(aa.budget)


def test_detection_rows_for_the_model_with_a_decoder(part_result):
    _, cfg, res = part_result
    det = res.tables["adversarial_detection"]
    assert set(det.model) == {"capsnet"} and {"autoattack", "reconstructive", "fgsm", "pgd"} <= set(det.attack)
    assert (det.detected <= det.fooled).all() and (det.fooled <= det.n).all()
    assert ((det.auc >= 0) & (det.auc <= 1) | det.auc.isna()).all()
    assert (det.val_n == 40).all() and det.threshold.nunique() == 1
    assert (det.undetected == det.fooled - det.detected).all()


def test_checks_are_recorded_with_keys_claims_know(part_result):
    from capsbench.report.claims import CHECK_KEYS

    ctx, _, res = part_result
    checks = res.tables["adversarial_checks"]
    assert set(checks.check) - {""} <= set(CHECK_KEYS)
    for model in ctx.models:
        keys = set(checks[checks.model == model].check)
        assert {"eps0", "monotone", "iterative", "near-zero", "square", "convergence", "restarts", "worst"} <= keys
    assert "detector" in set(checks[checks.model == "capsnet"].check)
    assert all(c.passed for c in res.checks if c.key in ("eps0", "worst"))
    names = {c.name for c in res.checks}
    assert "capsnet margin: input gradients are non-zero (informational)" in names
    assert set(res.figures) == {"adversarial_accuracy", "adversarial_losses", "adversarial_targeted", "adversarial_transfer",
                                "adversarial_detection", "adversarial_examples"}  # fmt: skip
    assert all(isinstance(f, Figure) for f in res.figures.values())
    s = res.summary
    assert s.startswith("## Adversarial") and "**Worst case**" in s and "**AutoAttack**" in s and "REDUCED" in s
    assert "Reconstruction detector" in s and "log(l / (1 - l))" in s


@pytest.mark.slow  # runs the whole part a second time
def test_part_is_seeded_and_shows_its_progress(part_result, capsys):
    ctx, cfg, res = part_result
    again = run_adversarial(dataclasses.replace(ctx, progress=True), cfg)
    for name in ("adversarial", "adversarial_autoattack", "adversarial_detection"):
        pd.testing.assert_frame_equal(again.tables[name], res.tables[name])
    err = capsys.readouterr().err
    # the sweep's bar, then one bar over AutoAttack, its checks and the reconstructive attack:
    # per (model, eps) job its planned gradients and queries (2 batches of 16 of the 24 images)
    jobs = len(list(product(ctx.models, cfg.strong_eps)))
    capsule_jobs = len(cfg.strong_eps)  # one capsule model: the reconstructive and the vote attack
    total = (jobs * planned_steps(cfg, "autoattack", 2) + capsule_jobs * planned_steps(cfg, "reconstructive", 2)
             + capsule_jobs * planned_steps(cfg, "vote", 2))
    assert "adversarial: 100%" in err and "adversarial: strong attacks:   0%" in err and f"{total}/{total}" in err
    # what runs, e.g. "adversarial: capsnet eps 0.1 apgd-t:  40%" (tqdm redraws at most every 0.1 s)
    assert re.search(r"adversarial: (capsnet|cnn-tiny) eps 0\.[13] (apgd-ce|apgd-t|square|apgd-ce 2x steps|"
                     r"apgd-ce \+1 restarts|reconstructive|vote): +\d+%", err)  # fmt: skip


def test_precheck_refuses_a_loss_no_model_provides(trained_cnn):  # noqa: F811
    from capsbench.parts.adversarial_run import precheck

    cfg = from_dict(AdversarialConfig, {"losses": ["margin"]}, "adversarial")
    with pytest.raises(CapsbenchError, match="no model of this run .* 'margin'.*needs capsule lengths"):
        precheck(cfg, {"cnn-tiny": trained_cnn})
    precheck(AdversarialConfig(), {"cnn-tiny": trained_cnn})  # the default list: each model's own losses


def test_example_eps_prefers_point_two():
    assert example_eps([0.0, 0.1, 0.2, 0.3]) == 0.2 and example_eps([0.0, 0.05, 0.3]) == 0.3


@pytest.mark.parametrize(
    "values, match",
    [
        ({"eps": [0.0, -0.1]}, "adversarial.eps values must be >= 0"),
        ({"eps": [0.0, 1.5]}, "adversarial.eps values must be <= 1"),
        ({"eps": [0.0, 0.3, 0.1]}, "sorted"),
        ({"eps": [0.1, 0.2]}, "must include 0 for the eps=0 == clean check"),
        ({"eps": [0.0]}, "> 0"),
        ({"batch_size": 0}, "adversarial.batch_size"),
        ({"n": 0}, "adversarial.n"),
        ({"pgd_step_size": -1.0}, "pgd_step_size"),
        ({"losses": ["hinge"]}, "unknown attack loss 'hinge'"),
        ({"losses": ["own"]}, "'own' is not one"),
        ({"losses": ["ce", "ce"]}, "twice"),
        ({"losses": []}, "adversarial.losses"),
        ({"aa_eps": [0.25]}, "aa_eps must be values of"),
        ({"aa_stages": ["fab-t"]}, "unknown attack 'fab-t'"),
        ({"apgd_steps": 0}, "apgd_steps"),
        ({"apgd_restarts": 0}, "apgd_restarts"),
        ({"square_queries": -5}, "square_queries"),
        ({"apgd_targets": 10}, "apgd_targets"),
        ({"recon_steps": 0}, "recon_steps"),
    ],
)
def test_config_refuses_bad_values(values, match):
    with pytest.raises(CapsbenchError, match=match):
        from_dict(AdversarialConfig, values, "adversarial")


def test_config_defaults_are_valid():
    cfg = from_dict(AdversarialConfig, {}, "adversarial")
    assert cfg.eps[0] == 0 and cfg.n == 1000 and cfg.step_size(0.2) == pytest.approx(0.05)


def test_checks_fail_on_bad_numbers():
    from capsbench.parts.adversarial_checks import autoattack_checks, monotone_check, pgd_checks, sanity_checks

    def curve(attack, accs, n=200, source="m", loss="any"):
        return pd.DataFrame({"model": "m", "attack": attack, "loss": loss, "eps": [0.0, 0.1, 0.3], "accuracy": accs,
                             "n": n, "source_model": source, "correct": [round(a * n) for a in accs],
                             "zero_grad_frac": float("nan")})  # fmt: skip

    assert monotone_check(curve("fgsm", [0.9, 0.5, 0.45]), "m", "fgsm").passed  # within noise
    assert not monotone_check(curve("fgsm", [0.9, 0.5, 0.7]), "m", "fgsm").passed
    fgsm = curve("fgsm", [0.9, 0.5, 0.2])
    same = {e: (round(a * 200), 200) for e, a in zip(fgsm.eps, fgsm.accuracy)}
    ok, near0 = pgd_checks(curve("pgd", [0.9, 0.3, 0.05]), same, fgsm, "m")
    assert ok.passed and near0.passed
    worse, far = pgd_checks(curve("pgd", [0.9, 0.7, 0.3]), same, fgsm, "m")
    assert not worse.passed and not far.passed and "eps 0.1: 70.0% vs 50.0%" in worse.detail
    worst = curve("worst-case", [0.9, 0.35, 0.1]).iloc[1:2]  # above PGD's 0.3 on the same images: impossible
    df = pd.concat([fgsm, curve("pgd", [0.85, 0.3, 0.05]), curve("fgsm", [0.9, 0.1, 0.0], source="other", loss="ce"), worst])
    counts = {("m", "clean", "-", 0.0, "m"): (180, None, 200), ("m", "clean@pgd", "-", 0.0, "m"): (180, None, 200)}
    counts.update({("m", "fgsm@pgd", "any", e, "m"): (c, None, 200) for e, c in {0.0: 180, 0.1: 100, 0.3: 40}.items()})
    aa = pd.DataFrame({"model": "m", "eps": 0.1, "stage": ["apgd-ce", "square", "apgd-ce 2x steps"],
                       "accuracy": [0.3, 0.2, 0.195], "n": 200, "fooled": [100, 20, 1]})  # fmt: skip
    checks = {c.name: c for c in sanity_checks(df, counts, aa, pd.DataFrame(columns=["model"]), ["m"], 0.01, 0.05)}
    assert not checks["m pgd (any): eps=0 equals clean"].passed and checks["m fgsm (any): eps=0 equals clean"].passed
    assert not checks["m fgsm: white-box at least as strong as transfer from other (ce)"].passed
    assert not checks["m eps 0.1: worst case <= every attack on its 200 images"].passed
    sq, conv = autoattack_checks(aa, "m", 0.01)
    assert (sq.key, sq.passed, conv.key, conv.passed) == ("square", False, "convergence", True)
    assert "fooled 20 more of 200 images (allowed 2)" in sq.detail
