"""Data-parallel fine-tuning under ``torch.distributed`` (``torchrun``), and nothing of our own.

Each process (a *rank*) holds the whole gated model and sees its own shard of every loader;
DistributedDataParallel averages the gradients, so every rank makes the same update and
its gates stay identical. What the ranks must agree on beyond that is reduced here: the
calibration statistics, λ's calibration figures, evaluation counts and the stop signal, so
the controller freezes and prunes the same slices at the same step everywhere. Only rank 0
prints and writes files. A single process is a world of one and costs nothing.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .batches import loader_length
from .errors import ConfigError

log = logging.getLogger(__name__)

#: How long a collective waits for a missing rank before failing (instead of hanging).
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without a process group)."""

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @classmethod
    def current(cls) -> World:
        """The initialised default process group, or a world of one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    # ----------------------------------------------------------------- collectives
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64)."""
        if not self.parallel:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place (and return it)."""
        if self.parallel:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
        return bool(self.sum([1.0 if flag else 0.0])[0] > 0) if self.parallel else bool(flag)

    def gather(self, value: float) -> list[float]:
        """``value`` of every rank, in rank order."""
        if not self.parallel:
            return [value]
        out = [torch.zeros(1, dtype=torch.float64) for _ in range(self.size)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.float64))
        return [float(t) for t in out]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.parallel:
            dist.barrier()

    # ----------------------------------------------------------------- models and data
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module a training step runs: DDP around ``model`` when there are several ranks.

        Unused parameters are allowed (a BERT pooler under a token-level loss, a layer a
        pruned gate no longer reaches); DDP broadcasts rank 0's values when it wraps.
        """
        if not self.parallel:
            return model
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)

    def shard(self, loader: Iterable) -> Iterable:
        """This rank's share of ``loader``: every rank gets the same number of batches.

        A :class:`~compressor.data.TensorLoader` shards its samples (each epoch's order
        split across ranks, as a DistributedSampler does); a DataLoader over a map-style
        dataset gets a DistributedSampler; any other iterable is dealt round-robin, batch
        by batch, the batches that would leave the ranks uneven dropped.
        """
        if not self.parallel:
            return loader
        if callable(getattr(loader, "shard", None)):
            return loader.shard(self.rank, self.size)
        if isinstance(loader, torch.utils.data.DataLoader) and _map_style(loader):
            return _with_distributed_sampler(loader, self.rank, self.size)
        return RoundRobin(loader, self.rank, self.size)


class RoundRobin:
    """Batches ``rank, rank + size, ...`` of another loader, ``len(loader) // size`` of them."""

    def __init__(self, loader: Iterable, rank: int, size: int):
        self.loader, self.rank, self.size = loader, rank, size
        self.per_rank = loader_length(loader) // size
        if self.per_rank == 0:
            raise ConfigError(f"the data loader has fewer batches than the {size} processes sharing it")

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.loader, "set_epoch", None)):
            self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        taken = 0
        for i, batch in enumerate(self.loader):
            if taken == self.per_rank:
                return
            if i % self.size == self.rank:
                taken += 1
                yield batch


def _map_style(loader: torch.utils.data.DataLoader) -> bool:
    return not isinstance(loader.dataset, torch.utils.data.IterableDataset) and loader.batch_size is not None


def _with_distributed_sampler(loader: torch.utils.data.DataLoader, rank: int, size: int):
    """The same DataLoader, its samples drawn by a DistributedSampler (shuffled if it was)."""
    shuffle = isinstance(loader.sampler, torch.utils.data.RandomSampler)
    sampler = torch.utils.data.DistributedSampler(loader.dataset, num_replicas=size, rank=rank, shuffle=shuffle,
                                                  drop_last=True)
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                                       num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                       pin_memory=loader.pin_memory, drop_last=loader.drop_last)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (its variables are set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env() -> World:
    """Join the process group torchrun describes (gloo on CPU, NCCL with GPUs), once.

    Processes sharing a machine split its cores: without ``OMP_NUM_THREADS`` each gets
    ``cores // local processes`` threads, so two ranks do not fight over the same cores.
    """
    if not launched_by_torchrun():
        return World.current()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ and local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    world = World.current()
    log.info("rank %d of %d", world.rank, world.size)
    return world


def leave() -> None:
    """Tear the process group down before the interpreter exits.

    Left to interpreter shutdown, gloo's background threads can be destroyed while still
    joinable, and the process aborts ("terminate called without an active exception")
    after its work is done, which torchrun reports as a failed run.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
