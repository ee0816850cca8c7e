"""One model across processes (train/distributed.py): each rank's share of a global batch, and
real torchrun runs on the CPU (gloo, 2 processes) that reach one process's weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from capsbench.core.errors import CapsbenchError
from capsbench.models import build_model
from capsbench.train import distributed
from capsbench.train.distributed import World


def test_each_rank_takes_its_contiguous_share_of_the_global_batch():
    x, y = torch.arange(8).view(8, 1), torch.arange(8)
    shares = [distributed.shard(World(rank, 2), (x, y)) for rank in range(2)]
    assert [s[1].tolist() for s in shares] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(torch.cat([s[0] for s in shares]), x)  # together, exactly the global batch
    assert distributed.shard(World(), (x, y))[0] is x  # one process: untouched


def test_a_world_size_that_does_not_divide_the_batch_is_refused():
    distributed.check_batch(World(0, 4), 128)
    with pytest.raises(CapsbenchError, match="train.batch_size = 33 is not divisible by the world size 2"):
        distributed.check_batch(World(0, 2), 33)


def test_rank_0_speaks_for_all_ranks_but_each_rank_names_its_own_problem(monkeypatch, capsys):
    import capsbench.cli as cli
    from capsbench.core.errors import RankError

    def fails_with(error):
        def cmd(args):
            raise error

        return cmd

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "cmd_list", fails_with(CapsbenchError("every rank met this")))
    assert cli.main(["list", "models"]) == 2 and capsys.readouterr().err == ""  # rank 0 says it
    monkeypatch.setattr(cli, "cmd_list", fails_with(RankError("local rank 5 has no GPU")))
    assert cli.main(["list", "models"]) == 2 and capsys.readouterr().err == "error: rank 1: local rank 5 has no GPU\n"


def test_every_training_job_s_batch_is_checked_before_the_first_trains():
    """A part's own models (MultiMNIST's batch) too, not only train.batch_size."""
    from capsbench.parts.multimnist import MultiMNISTConfig, MultiMnistRecipe
    from capsbench.run.jobs import TrainJob
    from capsbench.run.local import LocalExecutor
    from capsbench.run.plan import Plan
    from capsbench.train.config import TrainConfig

    def job(spec):
        return TrainJob("capsnet", spec, {}, 0, "k", "models/capsnet-k", "capsnet (seed 0)")

    mm = MultiMnistRecipe(MultiMNISTConfig(batch_size=33), 0, None, 100, TrainConfig())
    ex = LocalExecutor()
    ex.world = World(0, 2)
    with pytest.raises(CapsbenchError, match="multimnist.batch_size = 33 is not divisible by the world size 2"):
        plan = Plan(None, None, (0,), None, (job(TrainConfig(batch_size=32)), job(mm)))  # type: ignore[arg-type]
        ex.train(plan, None)  # refused before job 1 runs


def train(cache, *extra: str, ranks: int = 0) -> subprocess.CompletedProcess:
    """`capsbench train capsnet` on the smoke preset for 6 steps, under torchrun with ``ranks``
    processes (0: plain python), one CPU thread per process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks else []
    cmd = [sys.executable, *launcher, "-m", "capsbench", "train", "capsnet", "--preset", "smoke", "--device", "cpu",
           "--set", "train.steps=6", "--set", "train.log_every=3", "--data-dir", str(cache), "--no-progress",
           *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})


def entry(cache) -> dict:
    (model_pt,) = (cache / "models").glob("capsnet-*/model.pt")
    assert sorted(p.name for p in model_pt.parent.iterdir()) == ["lock", "meta.json", "model.pt"]  # no checkpoint left
    return torch.load(model_pt, weights_only=True)


@pytest.mark.slow
def test_two_gloo_ranks_reach_one_process_s_weights(shared_cache, tmp_path):
    import shutil

    caches = [tmp_path / "ddp", tmp_path / "single"]
    for c in caches:
        c.mkdir()
        shutil.copy(shared_cache / "mnist.pt", c / "mnist.pt")
    # fp32: under CPU bf16 autocast (auto, where the CPU has bf16) each rank's half-batch weight
    # gradients round to bf16 before DDP averages them, about 3e-3 from one process's weights
    fp32 = ("--set", "train.amp=fp32")
    ddp, single = train(caches[0], *fp32, ranks=2), train(caches[1], *fp32)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert single.returncode == 0, single.stderr[-2000:]
    assert "x 2 ranks (torchrun, DDP: 16 per rank)" in ddp.stdout
    assert ddp.stdout.count("test accuracy") == 1  # rank 0 alone speaks
    a, b = entry(caches[0]), entry(caches[1])
    assert (a["meta"]["world_size"], b["meta"]["world_size"]) == (2, 1) and a["meta"]["key"] == b["meta"]["key"]
    torch.manual_seed(0)
    init = build_model("capsnet").state_dict()
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    moved = max((b["model"][k] - init[k]).abs().max().item() for k in init)
    assert diff < 1e-5 < moved / 100  # the same weights within float tolerance, after real steps
    again = train(caches[0], *fp32, ranks=2)  # cached: rank 0 reads the entry and sends it to rank 1
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("from the cache") == 1
    losses = [[h["train_loss"] for h in m["meta"]["history"] if "train_loss" in h] for m in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the logged loss is the global batch's


@pytest.mark.slow
def test_torchrun_with_a_batch_the_ranks_cannot_share_fails_in_one_line(shared_cache, tmp_path):
    cache = tmp_path / "cache"
    p = train(cache, "--set", "train.batch_size=33", ranks=2)
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: train.batch_size = 33 is not divisible by the world size 2; choose --nproc-per-node "
                    "dividing 33, or --set train.batch_size=<a multiple of 2>"]  # fmt: skip
    assert not cache.exists()  # nothing written
