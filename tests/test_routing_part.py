"""The routing part on tiny trained models: its tables, the worst case over AutoAttack and the
vote attack, the routing statistics (uniform couplings have the maximum entropy and no top
parent), seeding, and the vote attack's surrogate."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from capsbench.attacks import PGD, VoteAttack
from capsbench.core.config import from_dict
from capsbench.models import build_model
from capsbench.parts.base import PARTS
from capsbench.parts.routing import routing_stats, run_routing
from capsbench.parts.routing_config import RoutingConfig
from tests.test_adversarial import fake_context
from tests.test_attacks import TINY_CAPS, data, one_thread, tiny_cnn, train  # noqa: F401 (fixtures)

SMALL = dict(n=48, composite_n=16, copies=1, attack_n=24, apgd_steps=3, apgd_targets=2, square_queries=10,
             vote_steps=3, batch_size=16)  # fmt: skip


@pytest.fixture(scope="module")
def models(data):
    tx, ty, _, _ = data
    out = {}
    for name in ("capsnet", "capsnet-uniform"):
        torch.manual_seed(0)
        out[name] = train(build_model(name, **TINY_CAPS, reconstruction=False), tx, ty, steps=25, lr=1e-2)
    out["cnn-tiny"] = train(tiny_cnn(), tx, ty, steps=80)
    return out


def routing_case(data, root):
    """The tiny case for tests/test_parts.py's CASES (every registered part runs on one)."""
    torch.manual_seed(0)
    caps = build_model("capsnet", **TINY_CAPS, reconstruction=False).eval()
    return fake_context({"capsnet": caps, "cnn-tiny": tiny_cnn().eval()}, n=48), small_cfg()


def small_cfg() -> RoutingConfig:
    return from_dict(RoutingConfig, SMALL, "routing")


@pytest.fixture(scope="module")
def result(models):
    ctx = fake_context(models, n=48)
    return ctx, run_routing(ctx, small_cfg())


def test_tables_have_every_measure_per_model(result):
    _, res = result
    p = PARTS.get("routing")
    assert {t: tuple(df.columns) for t, df in res.tables.items()} == p.tables
    df = res.tables["routing"]
    per = {m: set(g.measure) for m, g in df.groupby("model")}
    both = {"clean", "noise", "composite", "autoattack", "worst-case"}
    assert per["capsnet"] == per["capsnet-uniform"] == both | {"vote"}
    assert per["cnn-tiny"] == both  # no votes, no vote attack
    assert set(df[df.model == "capsnet"]["head"]) == {"dynamic"} and set(df[df.model == "cnn-tiny"]["head"]) == {"-"}
    assert (df.correct == (df.accuracy * df.n).round()).all()
    assert set(df[df.measure.isin(["autoattack", "vote", "worst-case"])].n) == {24}
    assert set(df[df.measure == "composite"].n) == {16}


def test_worst_case_is_at_most_every_attack_and_the_checks_pass(result):
    _, res = result
    df = res.tables["routing"]
    for _, g in df.groupby("model"):
        c = dict(zip(g.measure, g.correct))
        assert c["worst-case"] <= c["autoattack"] and c["worst-case"] <= c.get("vote", math.inf)
        assert c["autoattack"] <= c["clean"] * 24 / 48 + 24  # sanity: counts on the attacked subset
    assert res.checks and all(ch.passed for ch in res.checks)
    assert all(" correct of 24" in ch.detail for ch in res.checks if "worst case" in ch.name)  # the attacked n


def test_routing_statistics_per_condition(result):
    _, res = result
    st = res.tables["routing_stats"]
    assert set(st.model) == {"capsnet", "capsnet-uniform"}  # the CNN returns no couplings
    assert set(st.condition) == {"clean", "noise", "adversarial"}
    assert (st.entropy_max == math.log(10)).all()
    uni, dyn = st[st.model == "capsnet-uniform"], st[st.model == "capsnet"]
    assert uni.entropy.sub(math.log(10)).abs().max() < 1e-5 and uni.agreement.isna().all()  # couplings 1/C
    assert (dyn.entropy < math.log(10)).all() and dyn.agreement.between(0, 1).all()  # routing routes


def test_routing_stats_of_a_model_without_couplings_is_none(models, data):
    _, _, x, _ = data
    assert routing_stats(models["cnn-tiny"], x[:8], 8) is None


def test_the_part_is_seeded(result, models):
    ctx, res = result
    again = run_routing(ctx, small_cfg())
    for t in ("routing", "routing_stats"):
        pd.testing.assert_frame_equal(again.tables[t], res.tables[t])


def test_vote_attack_is_pgd_on_the_uniform_model_with_the_same_weights(models, data):
    """The surrogate's gradients are those of the uniform-routing model sharing the weights."""
    _, _, x, y = data
    dyn = models["capsnet"]
    uni = build_model("capsnet-uniform", **TINY_CAPS, reconstruction=False).eval()
    uni.load_state_dict(dyn.state_dict())
    vote = VoteAttack(dyn, 0.1, steps=3, loss="ce")(x[:16], y[:16])
    pgd = PGD(uni, 0.1, steps=3, loss="ce")(x[:16], y[:16])
    assert torch.allclose(vote, pgd, atol=1e-6)


def test_vote_attack_refuses_a_model_without_votes(models):
    with pytest.raises(ValueError, match="vote attack needs a capsule model"):
        VoteAttack(models["cnn-tiny"], 0.1)


def test_sizes_per_preset():
    p = PARTS.get("routing")
    assert [p.sized(s)["attack_n"] for s in ("smoke", "quick", "standard")] == [32, 100, 500]
    assert p.sized("full") == {} and RoutingConfig().attack_n == 1000
