"""Integer grids, as compressed-tensors stores them and serving kernels read them, and what
a matrix costs on one in stored bits. A leaf: no models, no statistics.

b bits hold symmetric integers q in [-2^(b-1), 2^(b-1) - 1]; a weight is q * scale. 8 bits:
one scale per output row (compressed-tensors' "channel" strategy). Fewer bits: one scale
per group of `group_size` consecutive inputs, the group one of the widths the serving
kernels accept (32, 64, 128); a matrix whose input width the group does not divide gets
one scale per row instead (also written as a channel strategy), never an odd group.
Scales are kept in the 16-bit dtype the folder stores, so the model in memory is exactly
what is saved.

Stored bits: the integers packed densely into 32-bit words per row (compressed-tensors'
pack-quantized layout: rankwise.formats.compressed), a scale per row or group in the
folder's float dtype and the matrix's shape (two int64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RankwiseError

WEIGHT_BITS = (8, 4, 3, 2)      # what a rounded weight may take
DEFAULT_WEIGHT_BITS = (8, 4, 3)   # offered unless asked: 2 bits wreck a 135M model (even
                                  # corrected), and pricing them costs a third more
FACTOR_BITS = (16, 8, 4)        # what factors may take (16: floats)
GROUP_SIZES = (32, 64, 128)     # what grouped kernels accept
CLIPPING = tuple(1 - 0.02 * i for i in range(16))   # fractions of the largest magnitude a scale keeps
FLOAT_BITS = 16                 # a float parameter as outputs store it by default
SHAPE_BITS = 2 * 64             # compressed-tensors' weight_shape: two int64 per matrix
ROUNDINGS = {"gptq": "error-compensating, column by column in the layer's input covariance "
                     "with each token weighted by its output gradient (GPTQ)",
             "rtn": "round to nearest (the baseline)"}    # rankwise.forms.rounding does them


@dataclass(frozen=True)
class Grid:
    """b-bit symmetric integers, one scale per row (group_size None) or per group of
    group_size inputs."""
    bits: int
    group_size: int | None

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in range(2, 9):
            raise RankwiseError(f"a grid holds 2 to 8 bits, got {self.bits!r}")

    @staticmethod
    def for_bits(bits: int, group_size: int) -> "Grid":
        """8 bits per output row; fewer bits in groups of group_size inputs."""
        return Grid(bits, None if bits == 8 else group_size)

    def __str__(self) -> str:
        where = "per row" if self.group_size is None else f"in groups of {self.group_size}"
        return f"int{self.bits} {where}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def fitted(self, columns: int) -> "Grid":
        """This grid for a matrix of `columns` inputs: its groups where they divide the
        width, one scale per row where they do not."""
        if self.group_size is None or columns % self.group_size == 0:
            return self
        return Grid(self.bits, None)

    def group_for(self, columns: int) -> int:
        """The width one scale covers in a matrix of `columns` inputs."""
        return self.fitted(columns).group_size or columns

    def scale(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-row scale of the columns `w` (m x g) holds, rounded to `dtype`: of the steps
        that put the row's largest magnitude at qmax or clip it by up to 30%
        (`CLIPPING`), the one whose rounding leaves the row the least squared error.
        Clipping a few outliers buys a finer step for the rest: with round-to-nearest at 3
        bits in groups of 64 on the embedded model, the KL to the dense model on WikiText-2
        fell from 2.50 to 1.73 (0.539 to 0.521 at 4 bits)."""
        top = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / self.qmax
        best = error = None
        for keep in CLIPPING:
            step = (top * keep).to(dtype).to(w.dtype).clamp_min(torch.finfo(dtype).tiny)
            left = (w - self.round(w, step)).square_().sum(1)
            if best is None:
                best, error = step, left
            else:
                better = left < error
                best, error = torch.where(better, step, best), torch.where(better, left, error)
        return best

    def round(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """w (m x k) on the grid of per-row `scale` (m)."""
        q = torch.round(w / scale[:, None]).clamp(-self.qmax - 1, self.qmax)
        return q * scale[:, None]

    def stored_bits(self, rows: int, columns: int, scale_bits: int = FLOAT_BITS) -> int:
        """Bits a rows x columns matrix takes on this grid: packed integers, scales of
        `scale_bits` and its shape."""
        groups = columns // self.group_for(columns)
        return rows * math.ceil(columns * self.bits / 32) * 32 + rows * groups * scale_bits + \
            SHAPE_BITS


def matrix_bits(rows: int, columns: int, grid: Grid | None, float_bits: int = FLOAT_BITS) -> int:
    """Stored bits of a rows x columns matrix: on `grid` (its scales in floats of
    `float_bits`), or as such floats (None)."""
    return rows * columns * float_bits if grid is None else \
        grid.stored_bits(rows, columns, float_bits)


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise RankwiseError(f"group_size must be one of {list(GROUP_SIZES)} (the widths "
                            f"grouped kernels accept), got {group_size!r}")
    return group_size
