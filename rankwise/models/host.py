"""The machine a run works on: devices by name, and giving freed host memory back to the
system (glibc keeps it otherwise)."""
from __future__ import annotations

import re

import torch

from ..errors import RankwiseError


def release_host_memory(collect: bool = True) -> None:
    """Hand freed memory back to the system: glibc keeps large freed blocks in its arenas
    (loading, sampling and the statistics walk free a lot), which otherwise stays in the
    process's resident memory for good. `collect`: run Python's garbage collector first
    (a tenth of a second with transformers loaded)."""
    import ctypes
    import gc
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to trim
        pass


MMAP_THRESHOLD = 1 << 22         # bytes: every tensor this large mapped and unmapped whole


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc serves an allocation below its mmap threshold from its heap arenas, and raises
    that threshold (up to 32 MB) each time a larger mapped block is freed: after a few
    large temporaries, tensors of several MB come from the arenas, where what is freed
    between long-lived tensors stays resident, and a walk whose allocated bytes are flat
    creeps up in resident memory. A fixed threshold maps every tensor of 4 MB or more on
    its own and returns it to the system when it is freed. False where not glibc."""
    import ctypes
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


DEVICES = "cpu, cuda, cuda:N or auto (cuda when present)"


def resolve_device(spec: str) -> str:
    """cpu, cuda, cuda:N or auto (cuda when present), checked against this machine."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    if not re.fullmatch(r"cuda(:\d+)?", str(spec)):
        raise RankwiseError(f"unknown device {spec!r}; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise RankwiseError(f"device {spec} was asked for but no GPU is available")
    return spec
