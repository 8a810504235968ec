"""Rounded weights kept packed in memory where the host has a kernel for them, so a loaded
output takes at inference about the bytes it takes on disk.

torch's CPU kernels run 4-bit weights in groups (`_weight_int4pack_mm_for_cpu`) and 8-bit
weights per row (`_weight_int8pack_mm`) on 16-bit activations at the speed of a dense
matmul or better; on float32 activations they are several times slower than one, and no
kernel takes 2- or 3-bit weights. A model loaded in bfloat16 or float16 on the CPU
therefore keeps its 4- and 8-bit layers packed (PackedLinear); every other layer on a grid
is held as floats, as is a model loaded in float32, and the load says so once.

A PackedLinear is still what the writer stores (its `weight` and `rankwise_scale` give the
grid's exact values back), so a loaded output saves to the same bytes.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .grids import Grid

log = logging.getLogger(__name__)

_INT4_GROUPS = (32, 64, 128, 256)       # what the CPU int4 kernel groups by


def runs_packed(grid: Grid, shape: tuple[int, int], dtype: torch.dtype,
                device: torch.device) -> bool:
    """Whether a matrix of `shape` on `grid` has a kernel here for `dtype` activations."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if grid.bits == 4:
        return grid.fitted(shape[1]).group_size in _INT4_GROUPS
    return grid.bits == 8 and grid.group_size is None


class PackedLinear(nn.Module):
    """A linear layer whose weight stays on its grid in memory, run by torch's kernel for
    that grid (module docstring): 4-bit in the int4 kernel's own layout with its scales,
    8-bit as int8 with a scale per row. Its buffers are not state: the writer stores the
    grid's values (`weight`, `rankwise_scale`) as it stores any rounded weight."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        grid, scale = linear.rankwise_grid, linear.rankwise_scale.float()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.rankwise_grid = grid
        self.group = grid.group_for(self.in_features)
        q = torch.round(weight.reshape(self.out_features, -1, self.group) / scale[:, :, None])
        q = q.reshape(self.out_features, self.in_features)
        if grid.bits == 4:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                (q + 8).to(torch.int32), 1)
            scales = torch.stack([scale.T, torch.zeros_like(scale.T)], -1).contiguous()
            self.register_buffer("packed", packed, persistent=False)
            self.register_buffer("scales", scales.to(dtype), persistent=False)
        else:
            self.register_buffer("packed", q.to(torch.int8), persistent=False)
            self.register_buffer("scales", scale[:, 0].to(dtype), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.rankwise_grid.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group,
                                                           self.scales)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scales)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def rankwise_scale(self) -> torch.Tensor:
        """The scales (rows x groups, float32)."""
        if self.rankwise_grid.bits == 4:
            return self.scales[..., 0].T.float()
        return self.scales.float()[:, None]

    @property
    def weight(self) -> torch.Tensor:
        """The grid's values in float32 (for the writer and inspection; forward never
        forms them)."""
        if self.rankwise_grid.bits == 4:       # the kernel applied to the identity, scale 1
            ones = torch.stack([torch.ones_like(self.scales[..., 0]),
                                torch.zeros_like(self.scales[..., 0])], -1)
            eye = torch.eye(self.in_features, dtype=self.scales.dtype)
            q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, ones)
            q = q.T.float().round()
        else:
            q = self.packed.float()
        scale = self.rankwise_scale
        return (q.reshape(self.out_features, -1, self.group) * scale[:, :, None]) \
            .reshape(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.rankwise_grid}"


def pack(model: nn.Module, dtype: torch.dtype, set_module) -> dict[str, int]:
    """Every layer on a grid that a kernel runs here put in packed form; returns the count
    of those left as floats, by grid (logged once)."""
    left: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        grid = getattr(module, "rankwise_grid", None)
        if grid is None or type(module) is not nn.Linear:
            continue
        if runs_packed(grid, tuple(module.weight.shape), dtype, module.weight.device):
            set_module(model, name, PackedLinear(module, dtype))
        else:
            left[str(grid)] = left.get(str(grid), 0) + 1
    if left:
        log.info("no kernel here runs %s weights on %s activations: %s held as floats",
                 ", ".join(left), str(dtype).removeprefix("torch."),
                 f"{sum(left.values())} matrices")
    return left
