"""Running the benchmark under `torchrun`: rank/world from the environment, one process group, threads per rank.

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) everything here is a no-op and the run is one process. Under
`torchrun --nproc_per_node N -m skiplayer benchmark ...` every rank measures its shard of the samples (or sweep
work) and writes its own part file; rank 0 merges the parts after a barrier. The process group is only used
for barriers: gloo on CPU, nccl when the model runs on CUDA (each rank on cuda:LOCAL_RANK).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from skiplayer.errors import UserError


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    threads: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def broadcast(self, obj):
        """Rank 0's value of `obj` on every rank (e.g. a default output directory named after the time)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (used so that one rank's error stops all ranks, not only itself)."""
        if not self.enabled:
            return ok
        import torch.distributed as dist
        device = f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"
        flag = torch.tensor([0 if ok else 1], device=device)
        dist.all_reduce(flag)
        return int(flag.item()) == 0

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def shard(self, items: list) -> list:
        """This rank's items: a strided slice, so every rank gets a similar mix of short and long samples."""
        return items[self.rank::self.world_size]


def init(device: str = "cpu", threads: int | None = None) -> tuple[Dist, str]:
    """Join the torchrun process group when there is one; set torch threads (cores // world size unless given).

    Returns the Dist handle and the device this rank should use (cuda -> cuda:LOCAL_RANK under torchrun)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    cuda = device.startswith("cuda")
    n_threads = threads or max(1, available_cores() // world)
    torch.set_num_threads(n_threads)
    dist_handle = Dist(rank, world, local_rank, None, n_threads)
    if world > 1:
        import torch.distributed as dist
        if cuda:
            if not torch.cuda.is_available():
                raise UserError(f"device '{device}' requested but CUDA is not available here: use --device cpu")
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        backend = "nccl" if cuda else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=timedelta(hours=6))
        dist_handle.backend = backend
    return dist_handle, device
