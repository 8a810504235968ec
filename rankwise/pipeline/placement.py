"""Where a compression's work runs and where the model waits between visits.

`device` runs the statistics and the decompositions; `home` holds the blocks the rest of the
time. Onloading is home = cpu, device = cuda: each block visits the device, everything
outside the blocks (embeddings, final norm, head) stays there for the walk. With home =
device nothing moves. Every move goes through this object, so a test on the CPU can take
the route a GPU takes: `copy=True` makes every move a real copy (fresh storage, the source
freed when nothing else holds it), as a move between two devices is.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class Placement:
    def __init__(self, device: str | torch.device = "cpu", home: str | torch.device | None = None,
                 copy: bool = False):
        self.device = torch.device(device)
        self.home = self.device if home is None else torch.device(home)
        self.copy = copy

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

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor to the CPU memory the walk parks activations in."""
        return t.to("cpu", copy=self.copy)

    def onload(self, module: nn.Module) -> nn.Module:
        if self.moves:
            module._apply(self.to_device)
        return module

    def offload(self, module: nn.Module) -> nn.Module:
        if self.moves:
            module._apply(lambda t: t.to(self.home, copy=self.copy))
        return module

    @contextlib.contextmanager
    def outside(self, model: nn.Module, blocks: nn.Module):
        """Every parameter and buffer outside `blocks` on the device for the duration, home
        again afterwards."""
        inside = {id(t) for t in [*blocks.parameters(), *blocks.buffers()]}
        moved = [t for t in [*model.parameters(), *model.buffers()]
                 if id(t) not in inside] if self.moves else []
        for t in moved:
            t.data = self.to_device(t.data)
        try:
            yield
        finally:
            for t in moved:
                t.data = t.data.to(self.home, copy=self.copy)
