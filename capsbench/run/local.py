"""The local executor (`--executor local`, the default): the training jobs, then every seed's
parts, one after another in this process. Under torchrun every rank trains each job in DDP and
rank 0 alone evaluates and writes the run folder."""

from __future__ import annotations

import sys
from typing import Any

import torch

from capsbench.core.device import describe, resolve_device
from capsbench.run.evaluate import FigureSink, SeedRun, for_seed, run_seed, seed_parts
from capsbench.run.jobs import JobOutcome, train_here
from capsbench.run.plan import Plan
from capsbench.suite import Resolved
from capsbench.train import distributed
from capsbench.train.cache import as_recipe


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        self.world = distributed.World()
        self.ranks = 1  # torchrun's world size (the process group is left once training ends)

    @property
    def main(self) -> bool:
        """Whether this process evaluates and writes the run folder (torchrun: rank 0 only)."""
        return self.world.main

    def device(self, name: str) -> torch.device:
        """The run's device; under torchrun, joins the process group and takes this rank's GPU."""
        self.world, device = distributed.init(resolve_device(name))
        self.ranks = self.world.size
        return device

    def describe(self, device: torch.device) -> str:
        ranks = f"; {self.ranks} ranks (torchrun, DDP)" if self.ranks > 1 else ""
        return describe(device) + ranks

    def environment(self, device: torch.device) -> dict[str, Any]:
        return {"executor": "local", "world_size": self.ranks}

    def check(self, r: Resolved) -> None:
        """Before any work: every rank takes an equal share of each batch."""
        distributed.check_batch(self.world, r.train.batch_size)

    def train(self, plan: Plan, data: Any) -> dict[str, JobOutcome]:
        """Every job here; under torchrun every rank trains each in DDP, then all leave the group
        (rank 0 evaluates alone: a part that trains, tta, must not wait for the others)."""
        for job in plan.jobs:  # before the first job trains: the parts' own models too (MultiMNIST's batch)
            key, size = as_recipe(job.spec).batch_setting
            distributed.check_batch(self.world, size, key)
        outcomes = train_here(list(plan.jobs), plan.device, plan.request, data)
        distributed.barrier(self.world)
        distributed.leave(self.world)
        self.world = distributed.World(self.world.rank, 1, self.world.local_rank)
        return outcomes

    def evaluate(self, plan: Plan, data: Any, fresh: frozenset[str], sink: FigureSink) -> list[SeedRun]:
        r, req, seeds, runs = plan.suite, plan.request, plan.seeds, []
        for i, seed in enumerate(seeds):
            if len(seeds) > 1:
                print(f"seed {seed} ({i + 1} of {len(seeds)})", file=sys.stderr)
            suffix = f"_seed{seed}" if len(seeds) > 1 else ""
            runs.append(run_seed(for_seed(r, seed), req, seed_parts(r, i), data, fresh, sink, suffix))
        return runs

    def close(self) -> None:
        distributed.leave(self.world)
