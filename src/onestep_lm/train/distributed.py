"""torchrun / DistributedDataParallel plumbing: which process am I, which device, which backend.

The same `onestep-lm train ...` command runs alone or under `torchrun --nproc_per_node N`: torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK, and we join its process group (gloo on CPU, NCCL on GPU). Only the main
process (rank 0) writes files and shows progress bars; every decision that changes the control flow (skip a
step, stop, which checkpoint to resume from) is shared so that all processes take the same branch.
"""

from __future__ import annotations

import atexit
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
        atexit.register(teardown, info)
    return info, device


def current() -> Dist:
    """This process's place under torchrun (from its environment), without joining anything."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def any_true(flag: bool, info: Dist, device: torch.device) -> bool:
    """True on every process when the flag is true on any (so all processes take the same branch)."""
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def mean(t: torch.Tensor, info: Dist) -> torch.Tensor:
    """The mean of a tensor over the processes (the tensor itself when alone)."""
    if not info.active:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / info.world


def gather_objects(obj, info: Dist) -> list:
    """Every process's `obj` (picklable), in rank order, on every process."""
    if not info.active:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: Dist):
    """The main process's `obj` on every process."""
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: Dist) -> None:
    if info.active:
        dist.barrier()


def teardown(info: Dist) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the process group at the end of a successful command: every process waits for the others, then
    destroys the group. Destroying it only at interpreter exit (the atexit fallback, kept for error paths) can
    race with a peer that already left, and gloo may then abort the process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def maximum(value: float, info: Dist, device: torch.device) -> float:
    """The largest value over all processes (the value itself when running alone)."""
    if not info.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
