"""What to compress and how (CompressConfig).

It is validated at construction: a bad value is one RankwiseError sentence, raised
before any model is loaded. Every field's default and help text are written here once; the
command line and YAML recipes are generated from them (rankwise.options).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import RankwiseError
from ..forms.allocate import ALLOCATIONS
from ..forms.grids import (DEFAULT_WEIGHT_BITS, GROUP_SIZES, ROUNDINGS, WEIGHT_BITS,
                           check_group_size)
from ..forms.registry import offered
from ..geometry import DEFAULT_DAMPING
from ..options import check_choice, check_int, check_number, option
from ..serving.engines import ENGINES
from ..statistics.metrics import METRICS
from .budget import DEFAULT_RATIO, budget_of

# The vocabulary of cuts, written once: the option's choices and help, the manifest's
# `cut`, and the keys of the plans that make them (rankwise.cut.plans.PLANS).
CUTS = {
    "oneshot": "every layer projected from the dense model's statistics, all at once",
    "anchored": "block by block: each layer fitted to reproduce the dense model's output "
                "from the inputs the already-compressed blocks give it, then each block's "
                "factors refined toward the dense block's output",
}
FORM_CHOICES = tuple(offered())       # the forms --bits may choose besides dense floats


@dataclass
class CompressConfig:
    """The compression recipe: metric, budget, allocation and how softly to cut."""
    metric: str = option("kfac", "projection metric: " + "; ".join(
        f"{m.name} = {m.help}" for m in METRICS.values()), choices=METRICS)
    ratio: float | None = option(None, f"fraction of the targeted layers' parameters to remove, "
                                       f"in [0, 1) (default {DEFAULT_RATIO} unless --bits is "
                                       "given; 0 with --factor-bits: round only)")
    bits: float | None = option(None, "the budget in stored bits per original parameter of the "
                                      "targeted layers (scales and factors counted; floats are "
                                      "16): each layer is given the form that costs least in "
                                      "the K-FAC metric: low rank (factors in 16, 8 or 4 bits), "
                                      "its weight rounded, or rounded plus a low-rank "
                                      "correction; instead of --ratio")
    include: str | None = option(None, "regex: only target linear layers whose name matches")
    exclude: str | None = option(None, "regex: skip linear layers whose name matches")
    allocation: str = option("spectrum", "per-layer ranks: " + "; ".join(
        f"{a.name} = {a.help}" for a in ALLOCATIONS.values()), choices=ALLOCATIONS)
    min_rank: int = option(1, "smallest rank the spectrum allocation may give a layer")
    rank_multiple: int = option(0, "every rank a multiple of this (64 or 128 suit GPU matmul "
                                   "kernels); 0 = 64 for layers at least 1024 wide on both "
                                   "sides, exact ranks below; the spectrum allocation chooses "
                                   "among multiples")
    steps: int = option(1, "reach the ratio in this many cuts, re-measuring the statistics "
                           "on the partly compressed model before each (1: one cut)")
    cut: str | None = option(None, "how layers are fitted: " + "; ".join(
        f"{name} = {text}" for name, text in CUTS.items()) + " (default: anchored for the "
        "metrics that measure inputs, whiten and kfac; oneshot for svd and fisher)",
        choices=CUTS)
    anchor_mix: float = option(0.5, "anchored cut: the target of each layer, from its own "
                                    "output on the compressed stream (0, the sequential "
                                    "fit) to the dense model's output (1), in [0, 1]")
    anchor_damping: float = option(1e-2, "anchored cut: ridge of each layer's regression "
                                         "onto the compressed stream, toward the dense "
                                         "weight (times the input covariance's mean "
                                         "eigenvalue), in (0, 1); below about 1e-4 the "
                                         "weakest input directions are fitted to round-off "
                                         "and the factors depend on how the sums were "
                                         "grouped")
    refine_steps: int = option(16, "anchored cut: optimizer steps that train each block's "
                                   "factors toward the dense block's output after its cut "
                                   "(0: none)")
    refine_lr: float = option(5e-4, "anchored cut: Adam learning rate of the refinement")
    refine_windows: int | None = option(None, "anchored cut: calibration windows the "
                                              "refinement trains on (default: all)")
    rank_pattern: dict[str, int] = option(
        help="explicit {regex: rank} overrides (peft-style), e.g. '{q_proj: 16}'",
        factory=dict, metavar="YAML")
    damping: float = option(DEFAULT_DAMPING, "relative eigenvalue damping of the covariances "
                                             "(times their mean eigenvalue), in [0, 1)")
    search_generations: int = option(50, "search: most generations")
    search_seconds: float | None = option(None, "search: time limit in seconds (default none)")
    search_windows: int = option(4, "search: calibration windows held out as fitness data")
    search_offspring: int = option(8, "search: candidates per generation")
    factor_bits: int | None = option(None, "with --ratio: store the factors as integers (8 "
                                           "bits per output row, fewer in groups), and the "
                                           "layers kept dense at the same bits (default: "
                                           "floats); with --ratio 0, round the layers as they "
                                           "are (every width: uniform rounding)",
                                     choices=WEIGHT_BITS)
    forms: list[str] = option(help="with --bits: the forms a layer may take besides its dense "
                                   "floats: " + "; ".join(f"{name} ({text})" for name, text in
                                                          offered().items()) +
                                   "; rounded alone is mixed precision",
                              factory=lambda: list(FORM_CHOICES), choices=FORM_CHOICES)
    weight_bits: list[int] = option(help="with --bits: the widths a rounded weight may take",
                                    factory=lambda: list(DEFAULT_WEIGHT_BITS),
                                    choices=WEIGHT_BITS)
    group_size: int = option(64, "inputs per scale of a weight or factor stored below 8 bits "
                                 "(a width it does not divide gets one scale per row); "
                                 "factors stored so have ranks in multiples of it",
                             choices=GROUP_SIZES)
    rounding: str = option("gptq", "how weights and factors are rounded: " + "; ".join(
        f"{k} = {v}" for k, v in ROUNDINGS.items()), choices=ROUNDINGS)
    serve: str | None = option(None, "the engine the output is served with: every rounded "
                                     "matrix takes only a width its kernels run packed (" +
                               "; ".join(f"{e.name} = {e.help}" for e in ENGINES.values()) +
                               "); without it any width, and the run says what each engine "
                               "will run packed and what it must dequantize", choices=ENGINES)

    def __post_init__(self):
        check_choice("metric", self.metric, METRICS)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        for name in ("steps", "min_rank", "search_generations", "search_windows",
                     "search_offspring"):
            check_int(name, getattr(self, name))
        check_int("rank_multiple", self.rank_multiple, low=0)
        if self.cut is None:
            self.cut = "anchored" if METRICS[self.metric].inputs else "oneshot"
        check_choice("cut", self.cut, CUTS)
        if self.cut == "anchored" and not METRICS[self.metric].inputs:
            raise RankwiseError(f"the anchored cut fits each layer on the inputs the "
                                f"compressed model gives it, which metric {self.metric!r} "
                                "does not measure; use whiten or kfac, or --cut oneshot")
        self.anchor_mix = check_number("anchor_mix", self.anchor_mix, 0, 1, low_open=False,
                                       high_open=False)
        self.anchor_damping = check_number("anchor_damping", self.anchor_damping, 0, 1)
        check_int("refine_steps", self.refine_steps, low=0)
        self.refine_lr = check_number("refine_lr", self.refine_lr, 0)
        if self.refine_windows is not None:
            check_int("refine_windows", self.refine_windows)
        if self.search_seconds is not None:
            self.search_seconds = check_number("search_seconds", self.search_seconds, 0)
        if ALLOCATIONS[self.allocation].searched and self.metric == "svd":
            raise RankwiseError("allocation 'search' is seeded from the metric's spectra; "
                                "use it with whiten, fisher or kfac")
        self.damping = check_number("damping", self.damping, 0, 1, low_open=False)
        if not isinstance(self.rank_pattern, dict):
            raise RankwiseError(f"rank_pattern must be a mapping of regex: rank, "
                                f"got {self.rank_pattern!r}")
        for pattern in (self.include, self.exclude, *self.rank_pattern):
            try:
                re.compile(pattern or "")
            except re.error as e:
                raise RankwiseError(f"invalid regular expression {pattern!r}: {e}") from None
        for pattern, rank in self.rank_pattern.items():
            check_int(f"rank_pattern[{pattern!r}]", rank)
        self._check_budget()

    def _check_budget(self) -> None:
        """One budget: a ratio of parameters or bits; what goes with which."""
        check_group_size(self.group_size)
        check_choice("rounding", self.rounding, ROUNDINGS)
        if self.factor_bits is not None and (isinstance(self.factor_bits, bool) or
                                             self.factor_bits not in WEIGHT_BITS):
            raise RankwiseError(f"factor_bits must be one of {list(WEIGHT_BITS)}, got "
                                f"{self.factor_bits!r}")
        if not isinstance(self.forms, list) or not self.forms or \
                any(f not in offered() for f in self.forms):
            raise RankwiseError(f"forms must be a list of {list(offered())}, got {self.forms!r}")
        if not isinstance(self.weight_bits, list) or not self.weight_bits or \
                any(isinstance(b, bool) or b not in WEIGHT_BITS for b in self.weight_bits):
            raise RankwiseError(f"weight_bits must be a list of widths from {list(WEIGHT_BITS)}, "
                                f"got {self.weight_bits!r}")
        self.budget = budget_of(self)
        if self.serve is not None:
            check_choice("serve", self.serve, ENGINES)
            engine = ENGINES[self.serve]
            if self.factor_bits is not None and self.factor_bits not in engine.native_bits:
                raise RankwiseError(f"--serve {self.serve} runs " + " and ".join(
                    f"int{b}" for b in engine.native_bits) + f" weights packed, not "
                    f"--factor-bits {self.factor_bits}")

    @property
    def rounds(self) -> bool:
        """Whether anything is rounded onto an integer grid."""
        return self.budget.rounds

    def to_dict(self) -> dict:
        return asdict(self)








