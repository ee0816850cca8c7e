"""Every registered part, run on tiny inputs, returns the tables it declares in ``@part``, each
with exactly the declared columns in the declared order; and the device-side Tally."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from capsbench.core.config import from_dict
from capsbench.models import build_model
from capsbench.parts import load_parts
from capsbench.parts.base import PARTS, RunContext
from capsbench.parts.tally import Tally
from capsbench.train.config import TrainConfig
from tests.conftest import synthetic_digits


def affine_case(data, root):
    from tests import test_affine as ta

    return ta.fake_ctx(), ta.SMALL


def adversarial_case(data, root):
    from capsbench.parts.adversarial import AdversarialConfig
    from tests import test_adversarial as ta
    from tests import test_attacks as tk

    torch.manual_seed(0)
    caps = build_model("capsnet", **tk.TINY_CAPS).eval()
    ctx = ta.fake_context({"capsnet": caps, "cnn-tiny": tk.tiny_cnn().eval()}, n=40)
    values = dict(n=16, pgd_n=8, eps=[0.0, 0.1], aa_eps=[0.1], pgd_steps=2, examples=2, batch_size=8, apgd_steps=2,
                  apgd_targets=1, square_queries=3, check_restarts=1, recon_steps=2, detect_val_n=24)  # fmt: skip
    return ctx, from_dict(AdversarialConfig, values, "adversarial")


def capsules_case(data, root):
    from tests import test_capsules as tc

    models = {"capsnet": tc.seeded("capsnet", **tc.TINY_CAPS), "cnn-pooled": tc.seeded("cnn-pooled")}
    return tc.context(models, synthetic_digits(12, 1)[0], tc.WRONG), tc.small_cfg()


def multimnist_case(data, root):
    from tests import test_multimnist_train as tm

    return tm.context(data, root, {"capsnet": tm.TINY_CAPS, "cnn-pooled": {}}), tm.small_cfg()


def throughput_case(data, root):
    from tests import test_throughput as tt

    return tt.tiny_context(), tt.small_cfg(batch_sizes=[2], repeats=1, warmup=0, routing_iters=[1])


def tta_case(data, root):
    from capsbench.parts.tta import TimeToAccuracyConfig

    tiny = {"conv_channels": 16, "primary_types": 4, "primary_dim": 4, "class_dim": 8, "decoder_hidden": (32, 64)}
    ctx = replace(synthetic_context(data, root), models={"capsnet": SimpleNamespace(meta={"options": tiny})})
    return ctx, TimeToAccuracyConfig(batch_size=16, warmup_steps=1, max_steps=4, eval_every=2, eval_batch_size=64,
                                     test_n=64, train_n=256, prewarm_steps=0)  # fmt: skip


def table1_case(data, root):
    """One parameter count and one (barely) trained Table 1 variant, so both tables are written."""
    from capsbench.parts.table1 import Table1Config

    train = TrainConfig(steps=2, batch_size=8, augment="none", test_subset=16, log_every=1, amp="fp32")
    ctx = replace(synthetic_context(data, root), train_cfg=train)
    return ctx, Table1Config(claims=["params-baseline", "mnist-error-r1-norecon"], augment="none", test_n=16)


def synthetic_context(data, root) -> RunContext:
    """A CPU context with no trained models: for the parts that train their own."""
    return RunContext(models={}, test_x=data.test_x, test_y=data.test_y, train_cfg=TrainConfig(),
                      device=torch.device("cpu"), dtype=None, seed=0, progress=False, data=data,
                      cache_root=str(root))  # fmt: skip


def corruptions_case(data, root):
    from tests import test_corruptions as tc

    return tc.corruptions_case(data, root)


def routing_case(data, root):
    from tests import test_routing_part as tr

    return tr.routing_case(data, root)


def routing_iterations_case(data, root):
    from tests import test_routing_iterations as tr

    return tr.routing_iterations_case(data, root)


def viewpoints_case(data, root):
    from tests import test_viewpoints as tv

    return tv.viewpoints_case(root)  # tiny format-true smallNORB files, not the MNIST digits


CASES = {"affine": affine_case, "adversarial": adversarial_case, "capsules": capsules_case,
         "corruptions": corruptions_case, "multimnist": multimnist_case, "routing": routing_case,
         "routing-iterations": routing_iterations_case,
         "throughput": throughput_case, "tta": tta_case, "table1": table1_case,
         "viewpoints": viewpoints_case}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run much faster on one thread than on cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def registered() -> list[str]:
    load_parts()
    return PARTS.names()


def test_every_registered_part_has_a_tiny_case():
    assert set(registered()) == set(CASES)


@pytest.mark.parametrize("name", registered())
def test_part_tables_have_exactly_the_declared_columns(name, fake_mnist, tmp_path):
    p = PARTS.get(name)
    ctx, cfg = CASES[name](fake_mnist, tmp_path)
    res = p.run(ctx, cfg)
    assert set(res.tables) == set(p.tables)  # every case is built to write all of them
    for table, df in res.tables.items():
        assert tuple(df.columns) == p.tables[table], (table, list(df.columns))
        assert len(df) > 0, table


# ---- the Tally --------------------------------------------------------------------------------


def test_tally_sums_adds_replaces_puts_and_reads_once():
    t = Tally()
    assert ("a", 1) not in t
    t.add(("a", 1), 4, correct=torch.tensor(3), hits=torch.tensor(1))
    t.add(("a", 1), 6, correct=torch.tensor(2))
    t.put(("b", 2), 5, correct=torch.tensor(5))
    t.put(("b", 2), 7, correct=torch.tensor(6))
    t.span(torch.tensor([[0.25, 0.5]]))
    t.span(torch.tensor([[0.0], [0.75]]))
    got = t.read(torch.tensor(9), torch.tensor(0.5))
    assert ("a", 1) in t and list(got.values) == [("a", 1), ("b", 2)]  # insertion order
    assert got.values == {("a", 1): {"correct": 5, "hits": 1}, ("b", 2): {"correct": 6}}
    assert got.n == {("a", 1): 10, ("b", 2): 7}
    assert (got.lo, got.hi, got.spanned) == (0.0, 0.75, 3)
    assert got.extra == [9, 0.5] and type(got.extra[0]) is int and type(got.values[("a", 1)]["correct"]) is int


def test_empty_tally_reads_an_empty_range():
    got = Tally().read()
    assert got.values == {} and got.extra == [] and got.spanned == 0
    assert got.lo == math.inf and got.hi == -math.inf
