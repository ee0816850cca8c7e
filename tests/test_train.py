"""Training: learning happens, resume after interruption is exact, the cache returns the same weights."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from capsbench.core.errors import CapsbenchError
from capsbench.models import build_model
from capsbench.train import checkpoint
from capsbench.train.cache import cache_key, get_trained
from capsbench.train.config import train_config
from capsbench.train.divergence import check_loss
from capsbench.train.schedules import SCHEDULES, Schedule, make_optimizer
from capsbench.train.tasks import MnistTask
from capsbench.train.trainer import Trainer

CPU = torch.device("cpu")
TINY_CAPS = dict(conv_channels=16, primary_types=4)


def _train(fake, cfg, ckpt=None, seed=0, name="cnn-pooled", opts=None):
    torch.manual_seed(seed)
    model = build_model(name, **(opts or {}))
    return model, Trainer(model, MnistTask(cfg, fake, CPU), ckpt, progress=False).run()


@pytest.mark.slow
def test_training_lifts_accuracy_far_above_chance(fake_mnist):
    cfg = train_config("smoke", steps=40, test_subset=256)
    _, result = _train(fake_mnist, cfg, name="capsnet", opts=TINY_CAPS)
    assert result.test_accuracy > 0.5  # chance is 0.1
    assert result.steps == 40 and result.train_images_per_s > 0


@pytest.mark.slow
def test_resume_after_interrupt_gives_identical_weights(fake_mnist, tmp_path):
    cfg = train_config("smoke", steps=12, checkpoint_every=5, log_every=3, test_subset=64)
    full, _ = _train(fake_mnist, cfg)

    class Killed(Exception):
        pass

    ckpt = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    model = build_model("cnn-pooled")
    trainer = Trainer(model, MnistTask(cfg, fake_mnist, CPU), ckpt, progress=False)
    real_step = trainer.train_step

    def dying_step(batch):  # dies in the middle of step 8, after the checkpoint at step 5
        if trainer.step == 7:
            raise Killed
        return real_step(batch)

    trainer.train_step = dying_step
    with pytest.raises(Killed):
        trainer.run()
    assert checkpoint.load(ckpt)["step"] == 5
    torch.manual_seed(123)  # a resumed process starts with different global RNG state
    resumed_model, result = _train(fake_mnist, cfg, ckpt, seed=123)
    assert result.steps == 12
    for (k, a), b in zip(full.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_nan_loss_is_a_clear_error(fake_mnist):
    cfg = train_config("smoke", steps=6, log_every=2, lr=1e30, test_subset=64)
    with pytest.raises(CapsbenchError, match="diverged: loss is nan at step"):
        _train(fake_mnist, cfg)


def test_protocol_must_match_the_model_input(fake_mnist):
    with pytest.raises(CapsbenchError, match="does not match the training protocol"):
        Trainer(build_model("cnn-pooled", input_size=40), MnistTask(train_config("smoke"), fake_mnist, CPU),
                progress=False)


# ---- the schedule registry and the divergence check ---------------------------------------


def test_schedule_registry_holds_paper_and_onecycle():
    assert SCHEDULES.names() == ["onecycle", "paper"]
    with pytest.raises(CapsbenchError, match="unknown lr schedule 'linear'; known lr schedules: onecycle, paper"):
        make_optimizer(torch.nn.Linear(2, 1), 1e-3, Schedule("linear"), CPU)


def test_paper_schedule_is_the_continuous_exponential_decay():
    s = Schedule("paper", 0.96, 2000)
    for step in (0, 1, 999, 2000, 4000, 12345):
        assert s.factor(step) == 0.96 ** (step / 2000)  # exactly the former LambdaLR(opt, lambda s: decay ** (s / every))
    assert Schedule("paper", 0.5, 10).factor(20) == 0.25


def test_onecycle_schedule_values():
    s = Schedule("onecycle", warmup_steps=4, max_steps=14)
    assert [s.factor(k) for k in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, the first step already moves
    assert s.factor(4) == 1.0 and s.factor(9) == pytest.approx(0.5) and s.factor(14) == pytest.approx(0.0, abs=1e-15)
    assert s.factor(100) == pytest.approx(0.0, abs=1e-15)  # 0 after the budget
    assert Schedule("paper", 0.96, 2000, warmup_steps=4).factor(4 + 2000) == pytest.approx(0.96)  # decay after the warmup


def test_the_optimizer_steps_at_the_scheduled_rate():
    model = torch.nn.Linear(2, 1)
    s = Schedule("paper", 0.5, 3)
    opt, sched = make_optimizer(model, 0.1, s, CPU)
    assert isinstance(opt, torch.optim.Adam) and not opt.defaults["fused"]  # fused on CUDA only
    for k in range(7):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * s.factor(k))
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        sched.step()
    assert sched.state_dict()["lr_lambdas"] == [None]  # a plain function: checkpoints hold no schedule object


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf")])
def test_the_divergence_check_names_the_run_the_step_and_the_fix(loss):
    with pytest.raises(CapsbenchError) as e:
        check_loss(loss, "multimnist capsnet", 40, "multimnist.lr", "train.amp")
    assert str(e.value) == (f"multimnist capsnet diverged: loss is {loss} at step 40; lower the learning rate "
                            "(--set multimnist.lr=...) or train in fp32 (--set train.amp=fp32)")  # fmt: skip
    with pytest.raises(CapsbenchError, match=r"^training diverged: .* \(--set train.lr=...\) .* \(--set train.amp=fp32\)$"):
        check_loss(loss, "", 3)
    check_loss(1e30, "fine", 1)  # large is not diverged


def test_epoch_order_is_the_host_randperm_of_the_derived_seed():
    from capsbench.core.seeds import derive_seed
    from capsbench.train.tasks import epoch_order

    expected = torch.randperm(50, generator=torch.Generator().manual_seed(derive_seed(3, 2)))
    assert torch.equal(epoch_order(50, 3, 2, CPU), expected)
    assert not torch.equal(epoch_order(50, 3, 1, CPU), expected)


def test_cache_key_depends_on_what_determines_weights():
    cfg = train_config("smoke")
    base = cache_key("capsnet", {"routing_iters": 1}, cfg, CPU)
    assert base == cache_key("capsnet", {"routing_iters": 1}, train_config("smoke", log_every=7, checkpoint_every=3), CPU)
    assert base != cache_key("capsnet", {"routing_iters": 1}, train_config("smoke", seed=1), CPU)
    assert base != cache_key("capsnet", {"routing_iters": 3}, cfg, CPU)
    assert base != cache_key("capsnet", {"routing_iters": 1}, train_config("smoke", augment="canvas"), CPU)
    assert base != cache_key("capsnet", {"routing_iters": 1}, cfg, torch.device("cuda"))


@pytest.mark.slow
def test_cache_returns_identical_weights_without_training(fake_mnist, cache_root):
    cfg = train_config("smoke", steps=4, test_subset=64)
    first = get_trained("capsnet", cfg, CPU, TINY_CAPS, progress=False, data=fake_mnist)
    second = get_trained("capsnet", cfg, CPU, TINY_CAPS, progress=False, data=None)  # no data needed
    assert not first.cached and second.cached
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert second.meta["test_accuracy"] == first.meta["test_accuracy"]
    folder = cache_root / "models" / f"capsnet-{first.meta['key']}"
    assert sorted(p.name for p in folder.iterdir()) == ["lock", "meta.json", "model.pt"]


def test_tampered_cached_model_is_refused(fake_mnist, cache_root):
    cfg = train_config("smoke", steps=2, test_subset=64)
    tm = get_trained("cnn-pooled", cfg, CPU, progress=False, data=fake_mnist)
    path = cache_root / "models" / f"cnn-pooled-{tm.meta['key']}" / "model.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CapsbenchError, match="corrupt"):
        get_trained("cnn-pooled", cfg, CPU, progress=False, data=fake_mnist)


def _train_in_process(root: str, queue) -> None:
    import os

    os.environ["CAPSBENCH_DATA_DIR"] = root
    from tests.conftest import FakeMNIST, synthetic_digits

    tx, ty = synthetic_digits(512, 0)
    vx, vy = synthetic_digits(64, 1)
    torch.set_num_threads(1)
    cfg = train_config("smoke", steps=3, test_subset=64)
    tm = get_trained("capsnet", cfg, CPU, TINY_CAPS, progress=False, data=FakeMNIST(tx, ty, vx, vy))
    queue.put((tm.cached, tm.model.state_dict()["W"].sum().item()))


@pytest.mark.slow
def test_two_processes_share_one_training_run(cache_root):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_train_in_process, args=(str(cache_root), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [False, True]  # one trained, the other waited and reused
    assert results[0][1] == results[1][1]


KILL_SCRIPT = """
import sys, torch
from capsbench.models import build_model
from capsbench.train.config import train_config
from capsbench.train.tasks import MnistTask
from capsbench.train.trainer import Trainer
from tests.conftest import FakeMNIST, synthetic_digits
tx, ty = synthetic_digits(2048, 0)
vx, vy = synthetic_digits(256, 1)
torch.manual_seed(0)
cfg = train_config("smoke", steps=80, checkpoint_every=10, log_every=5, test_subset=64)
task = MnistTask(cfg, FakeMNIST(tx, ty, vx, vy), torch.device("cpu"))
Trainer(build_model("cnn-pooled"), task, sys.argv[1], progress=False).run()
"""


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_weights(fake_mnist, tmp_path):
    """A real kill -9 mid-run: the atomic checkpoint survives and resuming ends bit-identical."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    ckpt = tmp_path / "ckpt.pt"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(ckpt)], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run on past the checkpoint, into an unsaved stretch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = checkpoint.load(ckpt)["step"]
    assert 0 < step < 80, "the kill should land mid-run"
    cfg = train_config("smoke", steps=80, checkpoint_every=10, log_every=5, test_subset=64)
    resumed, result = _train(fake_mnist, cfg, ckpt, seed=99)
    full, _ = _train(fake_mnist, cfg)
    assert result.steps == 80
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


# ---- early stopping (the paper's affNIST protocol: the model at the first evaluation >= a target) ----


def _stop_cfg(**over):
    return train_config("smoke", **{"steps": 40, "eval_every": 5, "checkpoint_every": 5, "log_every": 5,
                                    "test_subset": 64, "stop_at": 0.95, **over})  # fmt: skip


def test_a_run_stops_at_the_first_evaluation_reaching_the_target(fake_mnist):
    from capsbench.train.convergence import training_record

    model, result = _train(fake_mnist, _stop_cfg())
    evals = [h for h in result.history if "epoch" in h]
    assert result.steps < 40 and result.steps % 5 == 0 and result.test_accuracy >= 0.95
    assert [h["step"] for h in evals][-1] == result.steps and all(h["test_accuracy"] < 0.95 for h in evals[:-1])
    meta = {"steps": result.steps, "train": _stop_cfg().__dict__, "test_accuracy": result.test_accuracy,
            "test_n": result.test_n, "history": result.history, "params": 1, "train_seconds": 1.0, "key": "k"}
    rec = training_record("cnn-pooled", meta, _stop_cfg(), len(fake_mnist.train_x), 0, False)
    assert not rec["converged"] and rec["convergence"].startswith("stopped at the first evaluation at or above 95%")
    assert rec["images_seen"] == result.steps * 32 and rec["steps"] == result.steps


@pytest.mark.slow
def test_a_run_that_misses_the_target_trains_every_step_and_says_so(fake_mnist):
    from capsbench.train.convergence import training_record

    cfg = _stop_cfg(lr=1e-9, stop_at=0.99)  # cannot learn: accuracy stays near chance
    _, result = _train(fake_mnist, cfg)
    assert result.steps == 40 and result.test_accuracy < 0.99
    meta = {"steps": 40, "train": cfg.__dict__, "test_accuracy": result.test_accuracy, "test_n": result.test_n,
            "history": result.history, "params": 1, "train_seconds": 1.0, "key": "k"}
    rec = training_record("cnn-pooled", meta, cfg, len(fake_mnist.train_x), 0, False)
    assert rec["convergence"].startswith("target 99% not reached in 40 steps")


@pytest.mark.slow
def test_a_killed_early_stopping_run_resumes_to_the_same_stop_and_weights(fake_mnist, tmp_path):
    cfg = _stop_cfg()
    full, done = _train(fake_mnist, cfg)
    assert done.steps > 5, "the kill below must land before the stop"

    class Killed(Exception):
        pass

    ckpt = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    trainer = Trainer(build_model("cnn-pooled"), MnistTask(cfg, fake_mnist, CPU), ckpt, progress=False)
    real_step = trainer.train_step

    def dying_step(batch):  # dies in step 7, after the checkpoint (and evaluation) at step 5
        if trainer.step == 6:
            raise Killed
        return real_step(batch)

    trainer.train_step = dying_step
    with pytest.raises(Killed):
        trainer.run()
    resumed, result = _train(fake_mnist, cfg, ckpt, seed=123)
    assert result.steps == done.steps and result.test_accuracy == done.test_accuracy and result.resumed_from == [5]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_early_stopping_enters_the_cache_key_only_when_set():
    plain = train_config("quick")
    assert "stop_at" not in plain.weight_key() and "eval_every" not in plain.weight_key()
    assert cache_key("cnn-pooled", {}, plain, CPU) != cache_key("cnn-pooled", {}, train_config("quick", stop_at=0.99), CPU)
    stop = train_config("canvas-stop")
    assert stop.weight_key()["stop_at"] == 0.992 and stop.input_size == 40 and "99.2%" in stop.stop_text()
