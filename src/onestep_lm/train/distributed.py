"""torchrun / DistributedDataParallel plumbing: which process am I, which device, which backend.

The same `onestep-lm train ...` command runs alone or under `torchrun --nproc_per_node N`: torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK, and we join its process group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config key train.device: {name!r} asked for, but no CUDA device is available")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def setup(device_name: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when launched by it; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, info.local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def any_true(flag: bool, info: Dist, device: torch.device) -> bool:
    """True on every process when the flag is true on any (so all processes take the same branch)."""
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(info: Dist) -> None:
    if info.active:
        dist.barrier()


def teardown(info: Dist) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()
