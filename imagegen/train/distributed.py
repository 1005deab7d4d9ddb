"""Data parallelism for the trainer: the process layout, and the few collectives it needs.

The global batch of a step is split into ``micro_batches`` *slots* (TrainConfig).  Slot ``s``
reads the shard stream of loader rank ``s`` of ``micro_batches`` and draws its loss noise from
its own generator seeded by (seed, s).  With ``W`` processes (torchrun ranks) each process owns
``micro_batches / W`` consecutive slots and accumulates their gradients before DDP averages
across processes.  The global batch, its samples and its noise are therefore a function of the
config alone: one process with ``micro_batches=2`` and two processes with one slot each compute
the same losses and the same update (up to float summation order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def slots(self, micro_batches: int) -> list[int]:
        """The micro-batch slots this process computes."""
        if micro_batches % self.world_size:
            raise ValueError(f"micro_batches={micro_batches} must be a multiple of the number of processes "
                             f"({self.world_size}): each process computes micro_batches / processes slots")
        k = micro_batches // self.world_size
        return list(range(self.rank * k, (self.rank + 1) * k))


def current() -> DistEnv:
    """The layout of an initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistEnv()


def init_from_env(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment ($RANK, $WORLD_SIZE,
    $MASTER_ADDR, ...): NCCL when the run uses CUDA, gloo on CPU.  Single process: nothing to do."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Mean of a float tensor over processes (identity on one process)."""
    if not env.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / env.world_size


def all_true(env: DistEnv, flag: bool, device: torch.device) -> bool:
    """True when ``flag`` holds on every process."""
    if not env.distributed:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() == 0.0)


def gather(env: DistEnv, obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (pickled by torch.distributed between our own
    processes only: never from files)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def average_gradients(env: DistEnv, params: list[torch.nn.Parameter]) -> None:
    """All-reduce-mean the gradients of ``params`` in one flat buffer (for families DDP cannot
    wrap: several optimizers whose losses each reach only part of the parameters)."""
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= env.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
