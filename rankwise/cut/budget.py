"""The budget of a compression, one object chosen once from the recipe: a fraction of the
targeted layers' parameters to remove (RatioBudget) or stored bits per original parameter
(BitsBudget). Everything that differs between the two is asked of it: how much a step of
a soft cut removes, whether anything is rounded, whether every form is priced, what a run
reports. `budget_of` is the one place that tells them apart.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RankwiseError
from ..forms.grids import FLOAT_BITS
from ..options import check_number

DEFAULT_RATIO = 0.2


def budget_of(config) -> "RatioBudget | BitsBudget":
    """The budget a CompressConfig asks for, checked against the rest of its recipe."""
    return RatioBudget.of(config) if config.bits is None else BitsBudget.of(config)


@dataclass(frozen=True)
class RatioBudget:
    """Remove `ratio` of the targeted parameters by low rank, the factors (and layers kept
    whole) rounded at `factor_bits` when given; ratio 0 with factor_bits rounds only."""
    ratio: float
    factor_bits: int | None = None
    prices_forms = False       # ranks come from the metric's spectra, not from priced forms

    @classmethod
    def of(cls, config) -> "RatioBudget":
        ratio = DEFAULT_RATIO if config.ratio is None else \
            check_number("ratio", config.ratio, 0, 1, low_open=False)
        if ratio == 0 and config.factor_bits is None:
            raise RankwiseError("ratio 0 removes nothing; give --factor-bits to round the "
                                "layers as they are, or a ratio in (0, 1)")
        config.ratio = ratio            # the recipe as run, its default filled in
        return cls(ratio, config.factor_bits)

    @property
    def rounds(self) -> bool:
        """Whether anything is rounded onto an integer grid."""
        return self.factor_bits is not None

    def ratio_at(self, step: int, steps: int) -> float:
        """What the cuts up to `step` of `steps` remove together."""
        return self.ratio * step / steps

    def cuts(self, ratio: float) -> bool:
        """Whether a cut at `ratio` changes anything to refine."""
        return ratio > 0

    def describe(self, summary) -> str:
        kept = sum(r is not None for r in summary.ranks.values())
        return (f"compressed {kept}/{len(summary.ranks)} layers with {summary.metric}: removed "
                f"{summary.achieved_ratio:.4f} of the targeted parameters (requested "
                f"{self.ratio})")

    def title(self, summary) -> str:
        return f"ratio {summary.achieved_ratio:.3f}"


@dataclass(frozen=True)
class BitsBudget:
    """At most `bits` stored bits per original parameter of the targeted layers, every
    layer given the form that costs least in the K-FAC metric (rankwise.forms.pricing)."""
    bits: float
    prices_forms = True
    rounds = True

    # what a bits budget chooses itself, so the recipe may not set it
    FIXED = {"factor_bits": None, "rank_pattern": {}, "allocation": "spectrum",
             "metric": "kfac", "steps": 1}

    @classmethod
    def of(cls, config) -> "BitsBudget":
        if config.ratio is not None:
            raise RankwiseError("give a budget as --ratio or as --bits, not both")
        bits = check_number("bits", config.bits, 1, FLOAT_BITS, high_open=False)
        clash = next((name for name, fixed in cls.FIXED.items()
                      if getattr(config, name) != fixed), None)
        if clash is None and config.cut not in (None, "anchored"):
            clash = "cut"
        if clash:
            raise RankwiseError(
                f"--bits chooses every layer's form and width by pricing them in the K-FAC "
                f"metric and makes them on the anchored cut's walk, in one step; it takes no "
                f"--{clash.replace('_', '-')} (given {getattr(config, clash)!r})")
        return cls(bits)

    def ratio_at(self, step: int, steps: int) -> None:
        return None

    def cuts(self, ratio) -> bool:
        return True

    def describe(self, summary) -> str:
        return (f"compressed {len(summary.forms)} layers with {summary.metric} to "
                f"{summary.bits:.3f} bits per parameter (budget {self.bits})")

    def title(self, summary) -> str:
        return f"{summary.bits:.2f} bits"
