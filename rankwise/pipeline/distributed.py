"""Many processes under torchrun (torch.distributed; gloo on CPU, NCCL on GPUs).

Statistics are sums over tokens, so each rank measures a shard of the calibration batches
(batch i on rank i mod world) and the sums are all-reduced; the sampled labels of the
batches a rank skips are still drawn, so every batch gets the label it gets in one
process. Decompositions are spread over the ranks (layer j on rank j mod world) and each
owner broadcasts its full-rank factors and spectrum, from which every rank reads any rank
(the allocation, the search and the swap then run the same everywhere). Rank 0 writes.
"""
from __future__ import annotations

import os

import torch

from ..geometry import balance


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
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def is_leader() -> bool:
    return world()[0] == 0


def barrier() -> None:
    import torch.distributed as dist
    if world()[1] > 1:
        dist.barrier()


def all_reduce_sums(sums: dict, tokens: int) -> int:
    """Sum every tensor of `sums` (in place, in a fixed key order) and the token count
    over the ranks; returns the total tokens."""
    import torch.distributed as dist
    if world()[1] == 1:
        return tokens
    for key in sorted(sums):
        dist.all_reduce(sums[key])
    count = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(count)
    return int(count.item())


class Factorization:
    """Full-rank factors and the loss spectrum of one layer: the best factors of any rank
    are slices (each rank-one term depends only on its own direction)."""

    def __init__(self, B: torch.Tensor, A: torch.Tensor, spectrum: torch.Tensor):
        self.B, self.A, self.spectrum = B, A, spectrum

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return balance(self.B[:, :rank], self.A[:rank])

    def dropped_loss(self, rank: int) -> float:
        return float(self.spectrum[rank:].sum())


def shared_decompositions(names: list[str], shapes: dict, decompose) -> dict:
    """{name: decomposition}: this rank decomposes its share (`decompose(name)`), and every
    layer's full-rank factors and spectrum are broadcast from their owner."""
    import torch.distributed as dist
    rank, size = world()
    if size == 1:
        return {name: decompose(name) for name in names}
    out = {}
    for j, name in enumerate(names):
        owner = j % size
        m, n = shapes[name]
        k = min(m, n)
        if rank == owner:
            d = decompose(name)
            B, A = d.factors(k)
            spectrum = d.spectrum
        else:
            B, A = torch.empty(m, k, dtype=torch.float64), torch.empty(k, n, dtype=torch.float64)
            spectrum = torch.empty(k, dtype=torch.float64)
        B, A, spectrum = (t.contiguous().to(torch.float64) for t in (B, A, spectrum))
        for t in (B, A, spectrum):
            dist.broadcast(t, owner)
        out[name] = Factorization(B, A, spectrum)
    return out
