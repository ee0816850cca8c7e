"""How well a model was trained (train/convergence.py): the record of tables/models.csv, the
convergence rule and the preset's floor, on crafted cache metadata."""

from __future__ import annotations

import pytest

from capsbench.train.config import TrainConfig, train_config
from capsbench.train.convergence import RECORD_COLUMNS, convergence, training_record


def meta(steps: int = 1000, planned: int = 1000, evals=((500, 0.990), (1000, 0.9903)), batch: int = 60,
         subset: int = 0) -> dict:  # fmt: skip
    history = [{"step": s, "train_loss": 0.1} for s in range(100, steps + 1, 100)]
    history += [{"step": s, "test_accuracy": a, "test_n": 10000} for s, a in evals]
    return {"steps": steps, "train": {"steps": planned, "batch_size": batch, "train_subset": subset, "augment": "shift",
                                      "schedule": "onecycle"},
            "history": history, "test_accuracy": evals[-1][1], "test_n": 10000, "params": 8215568,
            "options": {"input_size": 28}, "train_seconds": 12.5, "key": "abc"}  # fmt: skip


def test_the_rule_compares_the_last_evaluation_with_one_an_epoch_before():
    cfg = TrainConfig(converge_tol=0.0005)
    ok, why = convergence(meta(), cfg, epoch_steps=500)
    assert ok and why == "99.00% at step 500, 99.03% at step 1000: 0.03 <= 0.05 points"
    ok, why = convergence(meta(evals=((500, 0.985), (1000, 0.9903))), cfg, epoch_steps=500)
    assert not ok and "0.53 > 0.05 points" in why  # still improving
    ok, why = convergence(meta(evals=((990, 0.99), (1000, 0.99))), cfg, epoch_steps=500)
    assert not ok and "no two test evaluations an epoch apart" in why  # equal, but 10 steps apart proves nothing
    ok, why = convergence(meta(steps=600, evals=((100, 0.99), (600, 0.99))), cfg, epoch_steps=500)
    assert not ok and why == "stopped at step 600 of 1000"


def test_the_record_counts_images_and_epochs_and_marks_the_floor():
    cfg = TrainConfig(floor=0.9905)
    two_epochs = meta(steps=2000, planned=2000, evals=((1000, 0.990), (2000, 0.9903)))
    rec = training_record("capsnet", two_epochs, cfg, train_images=60000, seed=3, cached=True)
    assert list(rec) == list(RECORD_COLUMNS)
    assert rec["images_seen"] == 120000 and rec["epochs"] == pytest.approx(2.0) and rec["seed"] == 3
    assert rec["converged"] and rec["test_accuracy"] == 0.9903 and not rec["meets_floor"]  # 99.03% < 99.05%
    sub = training_record("capsnet", meta(subset=6000), cfg, train_images=60000, seed=0, cached=False)
    assert sub["epochs"] == pytest.approx(10.0)  # 60,000 images seen of a 6,000-image subset


def test_presets_state_their_floor_and_standard_its_schedule():
    assert train_config("quick").floor == 0.985 and train_config("standard").floor == 0.993
    std = train_config("standard")
    assert std.schedule == "onecycle" and std.lr_schedule().factor(std.steps - 1) < 1e-6  # cosine to 0 at the end
    assert std.steps * std.batch_size / 60000 == pytest.approx(11.98, abs=0.01)
    assert train_config("standard-canvas").input_size == 40


def test_the_schedule_is_in_the_cache_key_and_the_rules_are_not():
    base = TrainConfig(steps=100)
    assert base.weight_key() != TrainConfig(steps=100, schedule="onecycle").weight_key()
    assert base.weight_key() != TrainConfig(steps=100, warmup_steps=10).weight_key()
    assert base.weight_key() == TrainConfig(steps=100, converge_tol=0.01, floor=0.9).weight_key()


def test_a_warmup_as_long_as_the_run_is_refused():
    from capsbench.core.errors import CapsbenchError

    with pytest.raises(CapsbenchError, match=r"train.warmup_steps must be < steps \(100\), got 100"):
        train_config("smoke", steps=100, warmup_steps=100)


@pytest.mark.parametrize(("eval_every", "due"), [(0, [10]), (5, [5, 10, 15, 20])])
def test_training_evaluates_only_where_the_rules_read_it(eval_every, due):
    """Epoch ends (10 steps here) at least an epoch before the last step (25), which final()
    evaluates: the convergence rule never reads one closer to the end. With eval_every (the
    stop rule) every one."""
    from types import SimpleNamespace

    import torch

    from capsbench.train.tasks import MnistTask

    images, labels = torch.zeros(320, 1, 28, 28, dtype=torch.uint8), torch.zeros(320, dtype=torch.long)
    data = SimpleNamespace(train_x=images, train_y=labels, test_x=images[:8], test_y=labels[:8])
    cfg = TrainConfig(steps=25, batch_size=32, eval_every=eval_every)
    task = MnistTask(cfg, data, torch.device("cpu"))
    assert [s for s in range(1, 26) if task.eval_due(s)] == due
