"""What the plans of one cut (rankwise.cut.plans) are handed, in three parts with one job
each:

  Recipe   what is asked: the config, its metric, allocation and budget, how outputs are
           stored (the floats' dtype, the group size), and what follows from them alone
           (rank steps, ranks from spectra, forms from ranks, what a walk collects);
  Work     how the work moves: the route (placement, spill, processes), the solver and
           the overlap of decompositions with the walk, the seed, the batch size, the time
           spent; the statistics walk and the decompositions;
  Target   the model and its targeted layers, and the surgery that puts a form
           (rankwise.forms) in place of a layer, with what each layer's cut is recorded as
           (Made).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..forms import allocate
from ..forms.allocate import ALLOCATIONS
from ..forms.grids import FLOAT_BITS
from ..forms.kinds import DENSE, LOW_RANK, ROUNDED
from ..forms.registry import Form, Storage
from ..forms.rounding import Rounded, Tally, round_factors, store
from ..models.blocks import names_by_block
from ..models.layers import (LowRankLinear, held_by, linear_shape, linear_weight,
                             max_useful_rank, set_module)
from ..pipeline.overlap import Beside, Inline
from ..pipeline.walk import BlockStatistics, Route, Wants, walk
from ..statistics import metrics
from ..statistics.hooks import LayerStats
from .config import CompressConfig
from .solving import Solver


@dataclass
class Made:
    """What the cut made of each layer it touched: its form, its predicted loss in the
    metric, the damping a root took where round-off made it raise the one asked for, and
    what the rounding did."""
    forms: dict[str, Form] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)   # by the cut's own problem
    priced: dict[str, float] = field(default_factory=dict)      # by the bits allocation
    raised_damping: dict[str, float] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)

    def damping(self, names: list[str], taken: float | None, asked: float) -> None:
        """Record a root's damping for the layers that used it, when it was raised."""
        if taken is not None and taken == taken and taken > asked * (1 + 1e-9):
            for name in names:
                self.raised_damping[name] = max(taken, self.raised_damping.get(name, 0.0))


class Recipe:
    """What the cut is asked (module docstring)."""

    def __init__(self, config: CompressConfig, scale_dtype: torch.dtype):
        self.config, self.scale_dtype = config, scale_dtype
        self.metric = metrics.get(config.metric)
        self.allocation = ALLOCATIONS[config.allocation]
        self.budget = config.budget
        self.storage = Storage(config.group_size, torch.finfo(scale_dtype).bits)

    def rank_steps(self, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
        """Each layer's rank step: --rank-multiple, or by default 64 for wide layers, and
        whole groups where factors are stored in groups (their width must divide)."""
        c = self.config
        grouped = c.factor_bits is not None and c.factor_bits < 8
        multiple = c.rank_multiple or (c.group_size if grouped else 0)
        return allocate.rank_multiples(shapes, multiple)

    def ranks(self, shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor],
              ratio: float) -> dict[str, int | None]:
        """The allocation's ranks, in each layer's rank steps, with the explicit overrides."""
        c = self.config
        return allocate.apply_rank_pattern(
            self.allocation.choose(shapes, spectra, ratio, c.min_rank, self.rank_steps(shapes)),
            shapes, c.rank_pattern)

    def wants(self, seed: int, **more) -> Wants:
        """What a walk collects for this metric, and `more`."""
        return Wants(**{"inputs": self.metric.inputs, "gradients": self.metric.gradients,
                        "seed": seed, **more})


class Work:
    """How the work of a cut moves (module docstring)."""

    def __init__(self, route: Route, overlap: Inline | Beside, seed: int, batch_size: int,
                 seconds: dict, damping: float):
        self.route, self.overlap, self.seed, self.batch_size = route, overlap, seed, batch_size
        self.seconds = seconds
        self.solver = Solver(route, damping)

    @property
    def device(self) -> torch.device:
        return self.route.placement.device

    @property
    def spill(self):
        return self.route.spill

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return self.route.placement.to_device(t)

    def batches(self, calib) -> list[torch.Tensor]:
        return list(calib.split(self.batch_size))

    def statistics(self, target: "Target", wants: Wants, calib, precomputed, calibrated: bool
                   ) -> Iterator[BlockStatistics]:
        """Block by block: walked, given, or none (`calibrated` False: svd without
        rounding)."""
        t0 = time.perf_counter()
        if precomputed is not None or not (calibrated or wants.backward):
            for k, names in enumerate(names_by_block(target.model, target.layers)):
                if names:
                    yield BlockStatistics(k, names, {n: precomputed[n] for n in names}
                                          if precomputed else {})
            return
        for block in walk(target.model, target.layers, self.batches(calib), self.route, wants):
            self.seconds["statistics"] += time.perf_counter() - t0
            yield block
            t0 = time.perf_counter()
        self.seconds["statistics"] += time.perf_counter() - t0

    def decompose(self, target: "Target", names: list[str], problem: Callable,
                  ranks: dict[str, int] | None, then: Callable[[dict], None],
                  overlap=Inline()) -> None:
        """Solver.decompositions of these layers; the dampings their roots took recorded."""
        def recorded(solved: dict) -> None:
            for name, (spectrum, damping, *_) in solved.items():
                target.made.damping([name], float(damping), self.solver.damping)
            then(solved)
        self.solver.decompositions(names, problem, target.shapes, ranks, target.dtypes(names),
                                   recorded, overlap)

    def solve(self, target: "Target", names: list[str], problem: Callable,
              ranks: dict[str, int] | None) -> dict:
        solved: dict = {}
        self.decompose(target, names, problem, ranks, solved.update)
        return solved


class Target:
    """The model, its targeted layers and the surgery on them (module docstring)."""

    def __init__(self, model: nn.Module, names: list[str], recipe: Recipe, made: Made):
        self.model, self.recipe, self.made = model, recipe, made
        self.layers = {name: model.get_submodule(name) for name in names}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: linear_shape(l) for name, l in self.layers.items()}

    def dtypes(self, names: list[str]) -> dict[str, torch.dtype]:
        return {name: held_by(self.layers[name]).dtype for name in names}

    def forms_of(self, ranks: dict[str, int | None]) -> dict[str, Form]:
        """Forms from a ratio's ranks: factors at --factor-bits (floats without); a layer
        given no rank keeps what it is (factors of its rank, or a weight rounded at
        --factor-bits, or left dense)."""
        bits = self.recipe.config.factor_bits or FLOAT_BITS
        forms = {}
        for name, rank in ranks.items():
            layer = self.layers[name]
            if rank is None and isinstance(layer, LowRankLinear):
                rank = layer.rank
            forms[name] = Form(LOW_RANK.name, rank, bits) if rank is not None else \
                Form(ROUNDED.name, None, bits) if bits < FLOAT_BITS else Form(DENSE.name)
        return forms

    def problem(self, name: str, stats: LayerStats | None, work: Work) -> tuple[torch.Tensor, dict]:
        """A layer's plain projection problem in the metric."""
        layer = self.layers[name]
        W = work.to_device(linear_weight(layer).detach())
        return W, self.recipe.metric.statistics(linear_shape(layer),
                                                **(stats.matrices() if stats else {}))

    def needs_fit(self, name: str, form: Form) -> bool:
        """Whether a layer must be made into its form from what it is now."""
        return form.of.needs_fit(form, self.layers[name])

    def cap(self, name: str) -> int:
        """The largest rank a layer can be given: one that still saves parameters, and never
        more than it has (a factored layer is only ever cut further)."""
        layer = self.layers[name]
        top = max_useful_rank(*linear_shape(layer))
        return min(top, layer.rank) if isinstance(layer, LowRankLinear) else top

    def put_factors(self, name: str, form: Form, B, A, spectrum) -> None:
        """The rank-r factors in place of the layer (whose dense weight is then freed)."""
        r = form.rank
        new = LowRankLinear.from_linear(self.layers[name], A[:r], B[:, :r])
        self.install(name, new, form, float(spectrum[r:].sum()))

    def put_rounded(self, name: str, form: Form, rounded: Rounded, predicted: float) -> None:
        self.store(self.layers[name], rounded)
        self.install(name, self.layers[name], form, predicted)

    def store(self, linear: nn.Linear, rounded: Rounded) -> None:
        """A rounded weight in place of `linear`'s, marked for the writer and tallied."""
        store(linear, rounded, self.recipe.scale_dtype)
        self.made.tally.add(rounded, self.recipe.config.rounding)

    def round_factors(self, name: str, form: Form, H: torch.Tensor | None) -> None:
        """The factors of a layer whose form rounds them, rounded in H (the token-weighted
        covariance of its inputs; None for round-to-nearest)."""
        layer, c = self.layers[name], self.recipe.config
        self.made.forms[name] = form
        a, b = round_factors(layer.A.weight.detach(), layer.B.weight.detach(), H,
                             form.grid(c.group_size), self.recipe.scale_dtype, c.rounding)
        for linear, rounded in ((layer.A, a), (layer.B, b)):
            self.store(linear, rounded)

    def install(self, name: str, new: nn.Module, form: Form, predicted: float) -> None:
        """`new` in place of layer `name` (a no-op when it is that layer), recorded as
        `form` with its predicted loss."""
        if new is not self.layers[name]:
            set_module(self.model, name, new)
            self.layers[name] = new
        self.made.forms[name] = form
        self.made.predicted[name] = self.made.predicted.get(name, 0.0) + predicted
