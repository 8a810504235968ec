"""Many processes under torchrun (torch.distributed; gloo on CPU, NCCL on GPUs).

Statistics are sums over tokens, so each process walks a share of the calibration batches
(batch i on process i mod world; rankwise.pipeline.walk) and each block's sums are
all-reduced as the walk completes it. Decompositions are spread over the processes (a
block's layer j on process j mod world) and each owner broadcasts what the others need
of it: its spectrum and the factors the cut will take. Every process then holds the same
result; process 0 writes.

Every collective goes through one `Comm`, which puts its tensors on the backend's device
first: NCCL takes only GPU tensors (the process's own GPU), gloo CPU tensors. The move
is injectable, so a CPU test can check that every tensor reaches the collective through
it, as an NCCL run's must.
"""
from __future__ import annotations

import os
from typing import Callable

import torch


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return world()


def is_leader() -> bool:
    return world()[0] == 0


def barrier() -> None:
    import torch.distributed as dist
    if world()[1] > 1:
        dist.barrier()


def backend_device() -> torch.device:
    """The device the process group's collectives take tensors on."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Comm:
    """The collectives a compression uses, on the backend's device. `to_backend` moves a
    tensor there (default: to backend_device()); `ops` is torch.distributed or a stand-in
    with all_reduce and broadcast. One process is a Comm of size 1, whose collectives do
    nothing, so callers never ask whether there are others."""

    def __init__(self, rank: int, size: int,
                 to_backend: Callable[[torch.Tensor], torch.Tensor] | None = None, ops=None):
        import torch.distributed as dist
        self.rank, self.size = rank, size
        self.ops = ops or dist
        self.to_backend = to_backend or (lambda t: t.to(backend_device()))

    @classmethod
    def current(cls) -> "Comm":
        """The running process group's Comm (size 1 for one process)."""
        return cls(*world())

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.size

    def all_reduce(self, sums: dict) -> None:
        """Sum every tensor of `sums` over the processes, in place, in a fixed key order."""
        if self.size == 1:
            return
        for key in sorted(sums, key=str):
            t = self.to_backend(sums[key])
            self.ops.all_reduce(t)
            if t is not sums[key]:
                sums[key].copy_(t)

    def broadcast(self, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
                  owner: int, like: str | torch.device) -> torch.Tensor:
        """`t` from `owner` (the others pass None) to every process, then on device `like`."""
        if self.size == 1:
            return t.to(like)
        buffer = self.to_backend(t.to(dtype).contiguous()) if self.rank == owner else \
            self.to_backend(torch.empty(shape, dtype=dtype))
        self.ops.broadcast(buffer, owner)
        return buffer.to(like)

    def all_reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the processes (a parameter without one counts
        as zeros: a process that computed no loss this step)."""
        if self.size == 1:
            return
        grads = {}
        for i, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads[i] = p.grad
        self.all_reduce(grads)


ONE_PROCESS = Comm(0, 1)     # the collectives of a process alone: each does nothing
