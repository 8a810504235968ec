"""Where a compression's work runs and where the model waits between visits.

`device` runs the statistics and the decompositions; `home` holds the blocks the rest of the
time. Onloading is home = cpu, device = cuda: each block visits the device, everything
outside the blocks (embeddings, final norm, head) stays there for the walk. With home =
device nothing moves. A visit leaves the home copy of every tensor where it is, and a
tensor that is still the one that arrived, unwritten, goes back to it without a copy; a
tensor written during the visit (factors a block refinement trained) is copied back into
its home copy, and one created during the visit (the factors of a layer cut on the
device) is moved home.

Every move goes through this object, so a test on the CPU can take the route a GPU takes:
`copy=True` makes every move a real copy (fresh storage), as a move between two devices is,
and `free_bytes` (what the device has free) can be stood in for.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def device_free_bytes(device: torch.device) -> int | None:
    """Bytes free on a CUDA device; None (unknown) elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


class Placement:
    def __init__(self, device: str | torch.device = "cpu", home: str | torch.device | None = None,
                 copy: bool = False, free_bytes=device_free_bytes):
        self.device = torch.device(device)
        self.home = self.device if home is None else torch.device(home)
        self.copy = copy
        self.free_bytes = free_bytes
        self._visits: dict[int, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}

    @classmethod
    def of(cls, model: nn.Module, onload: str | torch.device | None = None) -> "Placement":
        """Onloading to `onload` from wherever the model is, or where the model is."""
        where = next(model.parameters()).device
        return cls(onload if onload is not None else where, home=where)

    @property
    def moves(self) -> bool:
        return self.copy or self.device != self.home

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, copy=self.copy)

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    def _arrive(self, key: int, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            home = t.data
            t.data = self.to_device(home)
            self._visits.setdefault(key, []).append((t, home, t._version))

    def _leave(self, key: int, tensors: list[torch.Tensor]) -> None:
        left = {id(t): (t, home, version) for t, home, version in self._visits.pop(key, [])}
        for t in tensors:
            t0, home, version = left.get(id(t), (None, None, None))
            if t0 is not t:                          # created during the visit
                t.data = t.data.to(self.home, copy=self.copy)
                continue
            if t._version != version:                # written during the visit
                home.copy_(t.data)
            t.data = home

    def onload(self, module: nn.Module) -> nn.Module:
        if self.moves:
            self._arrive(id(module), self._tensors(module))
        return module

    def offload(self, module: nn.Module) -> nn.Module:
        if self.moves:
            self._leave(id(module), self._tensors(module))
        return module

    @contextlib.contextmanager
    def resident(self, model: nn.Module, spare_bytes: int = 0):
        """The whole model on the device for the duration when it fits there with
        `spare_bytes` more (yields True); otherwise nothing moves (yields False). Where
        nothing moves anyway the model is resident already."""
        if not self.moves:
            yield True
            return
        free = self.free_bytes(self.device)
        need = sum(t.numel() * t.element_size() for t in self._tensors(model)) + spare_bytes
        if free is not None and need > free:
            yield False
            return
        self.onload(model)
        try:
            yield True
        finally:
            self.offload(model)

    @contextlib.contextmanager
    def outside(self, model: nn.Module, blocks: nn.Module):
        """Every parameter and buffer outside `blocks` on the device for the duration, home
        again afterwards."""
        inside = {id(t) for t in self._tensors(blocks)}
        outer = [t for t in self._tensors(model) if id(t) not in inside] if self.moves else []
        key = id(outer)
        self._arrive(key, outer)
        try:
            yield
        finally:
            self._leave(key, outer)
