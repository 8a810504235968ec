"""What every plan of one cut shares (rankwise.plans): the model and its targeted layers, the
recipe, the route the work takes, the solver, and the surgery that puts a form
(rankwise.forms) in place of a layer, with what each layer's cut is recorded as."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from . import allocate, metrics
from .allocate import ALLOCATIONS
from .config import CompressConfig
from .forms import Form
from .grids import FLOAT_BITS
from .layers import (CorrectedLinear, LowRankLinear, held_by, linear_shape, linear_weight,
                     max_useful_rank, set_module)
from .models import names_by_block
from .pipeline.overlap import Beside, Inline
from .pipeline.walk import BlockStatistics, Route, Wants, walk
from .rounding import Rounded, Tally, round_factors, store
from .solving import Solver
from .stats import LayerStats


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


class Cut:
    def __init__(self, model: nn.Module, config: CompressConfig, metric: metrics.Metric,
                 route: Route, names: list[str], seed: int, batch_size: int, seconds: dict,
                 overlap: Inline | Beside, scale_dtype: torch.dtype, made: Made):
        self.model, self.config, self.metric, self.route = model, config, metric, route
        self.seed, self.batch_size, self.seconds, self.overlap = seed, batch_size, seconds, overlap
        self.scale_dtype, self.made = scale_dtype, made
        self.allocation = ALLOCATIONS[config.allocation]
        self.layers = {name: model.get_submodule(name) for name in names}
        self.solver = Solver(route, config.damping)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: linear_shape(l) for name, l in self.layers.items()}

    def rank_steps(self) -> dict[str, int]:
        """Each layer's rank step: --rank-multiple, or by default 64 for wide layers, and
        whole groups where factors are stored in groups (their width must divide)."""
        c = self.config
        grouped = c.factor_bits is not None and c.factor_bits < 8
        multiple = c.rank_multiple or (c.group_size if grouped else 0)
        return allocate.rank_multiples(self.shapes, multiple)

    def ranks(self, spectra: dict[str, torch.Tensor], ratio: float) -> dict[str, int | None]:
        """The allocation's ranks, in each layer's rank steps, with the explicit overrides."""
        c, shapes = self.config, self.shapes
        return allocate.apply_rank_pattern(
            self.allocation.choose(shapes, spectra, ratio, c.min_rank, self.rank_steps()),
            shapes, c.rank_pattern)

    def forms_of(self, ranks: dict[str, int | None]) -> dict[str, Form]:
        """Forms from a ratio's ranks: factors at --factor-bits (floats without); a layer
        given no rank keeps what it is (factors of its rank, or a weight rounded at
        --factor-bits, or left dense)."""
        bits = self.config.factor_bits or FLOAT_BITS
        forms = {}
        for name, rank in ranks.items():
            layer = self.layers[name]
            if rank is None and isinstance(layer, LowRankLinear):
                rank = layer.rank
            forms[name] = Form.low_rank(rank, bits) if rank is not None else \
                Form.rounded(bits) if bits < FLOAT_BITS else Form.dense()
        return forms

    def batches(self, calib) -> list[torch.Tensor]:
        return list(calib.split(self.batch_size))

    def wants(self, **more) -> Wants:
        """What a walk collects for this metric, and `more`."""
        return Wants(**{"inputs": self.metric.inputs, "gradients": self.metric.gradients,
                        "seed": self.seed, **more})

    def statistics(self, wants: Wants, calib, precomputed) -> Iterator[BlockStatistics]:
        """Block by block: walked, given, or none (svd without rounding)."""
        t0 = time.perf_counter()
        if precomputed is not None or not (self.metric.needs_calibration or wants.backward):
            for k, names in enumerate(names_by_block(self.model, self.layers)):
                if names:
                    yield BlockStatistics(k, names, {n: precomputed[n] for n in names}
                                          if precomputed else {})
            return
        for block in walk(self.model, self.layers, self.batches(calib), self.route, wants):
            self.seconds["statistics"] += time.perf_counter() - t0
            yield block
            t0 = time.perf_counter()
        self.seconds["statistics"] += time.perf_counter() - t0

    def problem(self, name: str, stats: LayerStats | None) -> tuple[torch.Tensor, dict]:
        """A layer's plain projection problem in the metric."""
        layer = self.layers[name]
        W = self.route.placement.to_device(linear_weight(layer).detach())
        return W, self.metric.statistics(linear_shape(layer), **(stats.matrices() if stats else {}))

    def decompose(self, names: list[str], problem: Callable, ranks: dict[str, int] | None,
                  then: Callable[[dict], None], overlap=Inline()) -> None:
        """Solver.decompositions of these layers; the dampings their roots took recorded."""
        def recorded(solved: dict) -> None:
            for name, (spectrum, damping, *_) in solved.items():
                self.made.damping([name], float(damping), self.config.damping)
            then(solved)
        self.solver.decompositions(names, problem, self.shapes, ranks, self.dtypes(names),
                                   recorded, overlap)

    def solve(self, names: list[str], problem: Callable, ranks: dict[str, int] | None) -> dict:
        solved: dict = {}
        self.decompose(names, problem, ranks, solved.update)
        return solved

    def dtypes(self, names: list[str]) -> dict[str, torch.dtype]:
        return {name: held_by(self.layers[name]).dtype for name in names}

    def needs_fit(self, name: str, form: Form) -> bool:
        """Whether a layer must be fitted to its form: factors of a lower rank than it has
        (or any, when dense), or a dense weight to round."""
        layer = self.layers[name]
        if form.factored:
            return not (isinstance(layer, LowRankLinear) and form.rank >= layer.rank)
        return form.rounds_weight

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
        self._replace(name, new, form, float(spectrum[r:].sum()))

    def put_rounded(self, name: str, form: Form, rounded: Rounded, predicted: float) -> None:
        store(self.layers[name], rounded, self.scale_dtype)
        self.made.tally.add(rounded, self.config.rounding)
        self._replace(name, self.layers[name], form, predicted)

    def put_corrected(self, name: str, form: Form, rounded: Rounded, B, A, spectrum) -> None:
        """The rounded weight plus its rank-r correction in place of the layer."""
        r, layer = form.rank, self.layers[name]
        new = CorrectedLinear.from_linear(layer, rounded.weight.to(held_by(layer)), A[:r],
                                          B[:, :r])
        store(new.base, rounded, self.scale_dtype)
        self.made.tally.add(rounded, self.config.rounding)
        self._replace(name, new, form, float(spectrum[r:].sum()))

    def round_factors(self, name: str, form: Form, H: torch.Tensor | None) -> None:
        """The factors of a layer whose form rounds them, rounded in H (the token-weighted
        covariance of its inputs; None for round-to-nearest)."""
        layer = self.layers[name]
        self.made.forms[name] = form
        grid = form.grid(self.config.group_size)
        a, b = round_factors(layer.A.weight.detach(), layer.B.weight.detach(), H, grid,
                             self.scale_dtype, self.config.rounding)
        for linear, rounded in ((layer.A, a), (layer.B, b)):
            store(linear, rounded, self.scale_dtype)
            self.made.tally.add(rounded, self.config.rounding)

    def _replace(self, name: str, new: nn.Module, form: Form, predicted: float) -> None:
        if new is not self.layers[name]:
            set_module(self.model, name, new)
            self.layers[name] = new
        self.made.forms[name] = form
        self.made.predicted[name] = self.made.predicted.get(name, 0.0) + predicted



def form_of(layer: nn.Module) -> Form:
    """The form a layer is in (what a cut that did not touch it leaves)."""
    if isinstance(layer, LowRankLinear):
        grid = getattr(layer.A, "rankwise_grid", None)
        return Form.low_rank(layer.rank, grid.bits if grid else FLOAT_BITS)
    if isinstance(layer, CorrectedLinear):
        return Form.corrected(layer.base.rankwise_grid.bits, layer.rank)
    grid = getattr(layer, "rankwise_grid", None)
    return Form.rounded(grid.bits) if grid else Form.dense()
