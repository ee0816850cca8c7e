"""One model across several processes: ``torchrun --nproc-per-node N -m capsbench train MODEL``.

torchrun starts N processes and sets RANK, WORLD_SIZE and LOCAL_RANK; ``init`` joins them in a
process group (NCCL on GPUs, gloo on the CPU). The Trainer then wraps the model in
DistributedDataParallel: every rank builds the same global batch (the same indices and the same
augmentation draws, since every rank holds the same generator state), takes its contiguous share
(``shard``), and DDP averages the gradients, so N ranks follow one process's trajectory within
float tolerance (no batch norm in these models; routing is per example). Dropout is the exception:
each rank draws its masks from its own stream, seeded by (seed, step, rank), so the CNN baselines
train with the same statistics as one process but not bit for bit its masks. Rank 0 alone
writes checkpoints and the cache entry; every rank evaluates the same weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from capsbench.core.errors import CapsbenchError, RankError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise CapsbenchError(f"${name} must be an integer (torchrun sets it), got {value!r}") from None


def from_env() -> World:
    """The World torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (none: one process)."""
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def current() -> World:
    """The joined process group's World, or one process when none was joined."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (if there is one) and return the World and this rank's device
    (``cuda:LOCAL_RANK`` on GPUs)."""
    world = from_env()
    if not world.active:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise RankError(f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                 "give torchrun --nproc-per-node at most the number of GPUs")  # fmt: skip
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def check_batch(world: World, batch_size: int, key: str = "train.batch_size") -> None:
    """Every rank takes an equal share of each global batch."""
    if batch_size % world.size:
        raise CapsbenchError(f"{key} = {batch_size} is not divisible by the world size {world.size}; choose "
                             f"--nproc-per-node dividing {batch_size}, or --set {key}=<a multiple of {world.size}>")


def shard(world: World, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """This rank's contiguous share of every tensor of a global batch (B, ...) -> (B / size, ...)."""
    if not world.active:
        return batch
    return tuple(t.chunk(world.size)[world.rank] for t in batch)


class DistributedModel(DistributedDataParallel):
    """DDP that still answers the wrapped model's own methods (``objective``, ``input_size``...),
    so a task's loss hook runs unchanged on it."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap(world: World, model: nn.Module) -> nn.Module:
    """``model`` in DDP when several ranks train it (rank 0's initial weights are broadcast)."""
    if not world.active:
        return model
    device = next(model.parameters()).device
    return DistributedModel(model, device_ids=[device] if device.type == "cuda" else None)


def all_sum(world: World, *tensors: Tensor) -> None:
    """Sum each tensor over the ranks, in place."""
    for t in tensors if world.active else ():
        dist.all_reduce(t)


def from_main(world: World, value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; the others' ``value`` is ignored."""
    if not world.active:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(world: World, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. whether the cache already holds the model)."""
    return bool(from_main(world, flag))


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def leave(world: World) -> None:
    """Leave the process group (at the end of a torchrun process)."""
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
