"""torch.distributed set-up from torchrun's environment (env:// rendezvous): NCCL on GPU, gloo on CPU.

A plain ``ctmae`` run is world size 1 and touches none of this; under ``torchrun`` every rank calls ``setup`` once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0  # global rank
    world: int = 1  # number of processes
    local_rank: int = 0  # rank within the node: which GPU this process drives

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics and checkpoints."""
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pin this process's GPU.

    Args:
        device: the requested device (auto|cpu|cuda): gloo for CPU, NCCL when CUDA will be used.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return info


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        dist.barrier()


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a stop signal reached one process)."""
    if info.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The average of a tensor over ranks (for logging the global-batch loss)."""
    if info.world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world


def gather(items: list, info: DistInfo) -> list:
    """Concatenate every rank's list (picklable items), in rank order, on every rank."""
    if info.world == 1:
        return list(items)
    parts: list[list] = [[] for _ in range(info.world)]
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def cleanup(info: DistInfo) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
