"""Data parallelism under torchrun: who am I, and the process group.

`torchrun` (or `python -m llmpipe.runner.launch --processes N`) sets RANK / LOCAL_RANK / WORLD_SIZE;
without it, this is rank 0 of 1. The backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmpipe.errors import ParamError
from llmpipe.runner.ranks import launched_ranks


@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_environment(cls, requested_device: str = "cpu") -> "ProcessInfo":
        """This process as torchrun describes it, on its device (`auto`: CUDA when available)."""
        ranks = launched_ranks()
        return cls(rank=ranks.rank, world_size=ranks.world_size, local_rank=ranks.local_rank,
                   device=resolve_device(requested_device, ranks.local_rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_device_available(requested: str, key: str, source: str) -> None:
    """`cuda` where this PyTorch sees no CUDA device is refused in one line naming the params key (`key`)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ParamError(f"{source}: {key}: cuda, but this PyTorch sees no CUDA device "
                         "(a CPU-only build, or no GPU); use auto or cpu")


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` → CUDA when available, else CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def start(process: ProcessInfo) -> ProcessInfo:
    """Select the process's GPU and join the process group (when there is more than one process)."""
    if process.device.type == "cuda":
        torch.cuda.set_device(process.device)
    if process.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if process.device.type == "cuda" else "gloo")
    return process


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(process: ProcessInfo) -> Iterator[ProcessInfo]:
    """The process started (its GPU selected, the process group joined); on success every process waits for
    the others before leaving, and the group is left whatever happens."""
    start(process)
    try:
        yield process
        barrier()
    finally:
        stop()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
