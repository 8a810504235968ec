"""What a compression makes of one targeted layer: its form, and what that form costs in
stored bits. A leaf: shapes and grids only.

  dense       the weight as it is, in floats (16 bits a parameter as stored)
  lowrank     B A of rank r, both factors in floats (bits 16) or on a grid (8, 4)
  rounded     the weight on a grid of 8, 4, 3 or 2 bits
  corrected   the weight on a grid plus a float low-rank correction B A of its error
              (EoRA's form; stored like a LoRA adapter over the rounded weight)

The allocation chooses a form per layer (rankwise.allocate), the cut makes it
(rankwise.plans), and the manifest records it (`record`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import RankwiseError
from .grids import FLOAT_BITS, Grid, matrix_bits

KINDS = ("dense", "lowrank", "rounded", "corrected")


@dataclass(frozen=True)
class Form:
    kind: str
    rank: int | None = None       # lowrank: its rank; corrected: the correction's
    bits: int = FLOAT_BITS        # lowrank: the factors'; rounded, corrected: the weight's

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RankwiseError(f"unknown form {self.kind!r}; one of {', '.join(KINDS)}")
        if (self.rank is not None) != (self.kind in ("lowrank", "corrected")):
            raise RankwiseError(f"a {self.kind} form {'needs' if self.rank is None else 'has no'} rank")

    @staticmethod
    def dense() -> "Form":
        return Form("dense")

    @staticmethod
    def low_rank(rank: int, bits: int = FLOAT_BITS) -> "Form":
        return Form("lowrank", rank, bits)

    @staticmethod
    def rounded(bits: int) -> "Form":
        return Form("rounded", None, bits)

    @staticmethod
    def corrected(bits: int, rank: int) -> "Form":
        return Form("corrected", rank, bits)

    @property
    def factored(self) -> bool:
        """Whether the layer becomes two factors (a LowRankLinear)."""
        return self.kind == "lowrank"

    @property
    def rounds_weight(self) -> bool:
        """Whether the dense weight itself goes onto a grid."""
        return self.kind in ("rounded", "corrected")

    @property
    def rounds_factors(self) -> bool:
        return self.kind == "lowrank" and self.bits < FLOAT_BITS

    def grid(self, group_size: int) -> Grid | None:
        """The grid of the weight (rounded, corrected) or of the factors (lowrank below
        16 bits); None for floats."""
        if self.kind == "dense" or self.bits >= FLOAT_BITS:
            return None
        return Grid.for_bits(self.bits, group_size)

    def stored_bits(self, shape: tuple[int, int], group_size: int) -> int:
        """Bits the layer's weights take as stored (biases not counted)."""
        m, n = shape
        grid = self.grid(group_size)
        if self.kind == "dense":
            return m * n * FLOAT_BITS
        if self.kind == "rounded":
            return matrix_bits(m, n, grid)
        if self.kind == "lowrank":
            r = self.rank
            return matrix_bits(r, n, grid) + matrix_bits(m, r, grid)
        return matrix_bits(m, n, grid) + FLOAT_BITS * self.rank * (m + n)

    def __str__(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "lowrank":
            return f"rank {self.rank}" + (f", int{self.bits} factors" if self.bits < FLOAT_BITS else "")
        text = f"int{self.bits}"
        return text if self.kind == "rounded" else f"{text} + rank {self.rank} correction"

    def record(self) -> dict:
        return {"form": self.kind, **({"rank": self.rank} if self.rank is not None else {}),
                "bits": self.bits}


def params_of(form: Form, shape: tuple[int, int]) -> int:
    """Parameters the form keeps (a rounded weight keeps all of them)."""
    m, n = shape
    if form.kind == "lowrank":
        return form.rank * (m + n)
    if form.kind == "corrected":
        return m * n + form.rank * (m + n)
    return m * n
