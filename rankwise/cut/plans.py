"""How a cut goes, one plan per cut (config.CUTS names them): what the statistics walk must
collect (`wants`), what to do with a block's statistics as they arrive (`block`), and what
to do at the end (`finish`). The walks only move data; the plans decide, each handed the
cut's Recipe, Target and Work (rankwise.cut.surgery); how the forms are chosen is a
chooser (rankwise.cut.choosing) the budget picks.

  oneshot   every layer projected from the dense model's statistics. Ranks known up front
            (uniform, explicit) are cut as each block's statistics arrive; ranks from
            every layer's spectrum (spectrum, search) are chosen at the end, from factors
            parked on disk (rankwise.pipeline.spill) until the allocation, and the search,
            have seen them all.
  anchored  a first walk measures what the allocation needs (the spectra, or every form's
            price: rankwise.forms.pricing) and parks what the cut will need (each layer's
            gradient side, each block's output Fisher, each token's weight for rounding);
            then the two-stream walk (rankwise.pipeline.streams) cuts block by block on
            the compressed stream: each group of layers fitted to reproduce the dense
            model's outputs (geometry.anchored), each block's factors and corrections
            refined toward the dense block's output (rankwise.train.refine).
Rounding (rankwise.forms.rounding) always rides a two-stream walk, so each block is rounded on
the inputs the already-rounded blocks give it and its outputs passed on: a weight to round
is rounded when its group's inputs arrive, from the anchored target in the
token-weighted covariance of those inputs; factors to round after the block's refinement,
in the covariance of their inputs on the refined block. After a one-shot cut that rounds,
a second walk does only that, anchored to the float cut.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from ..errors import RankwiseError
from ..forms.registry import Form
from ..models.layers import set_module
from ..pipeline.spill import Spill
from ..pipeline.walk import BlockStatistics, Wants
from ..statistics.hooks import GRADIENT_SIDE
from .choosing import Known, Measurement, Parked, Priced
from .config import CUTS
from .search import SearchResult
from .streamed import Kept, StreamPass
from .surgery import Recipe, Target, Work


@dataclass
class Outcome:
    searched: SearchResult | None = None
    refinement: dict[int, tuple[float, float]] = field(default_factory=dict)


class _Plan:
    wants: Wants | None          # what the statistics walk collects (None: no walk)

    def block(self, block: BlockStatistics) -> None:
        raise NotImplementedError

    def finish(self) -> Outcome:
        raise NotImplementedError


# ---------------------------------------------------------------- what the first walk keeps

class _Parking:
    """What a later walk reads, parked per layer as each block's statistics arrive: the
    gradient side (the anchored fit's output metric), each token's weight (rounding's), the
    block's output Fisher (refinement's)."""

    def __init__(self, spill: Spill, gradients: bool, weights: bool, fisher: bool):
        self.spill, self.gradients, self.weights, self.fisher = spill, gradients, weights, fisher
        self.fishers: set[int] = set()

    def block(self, block: BlockStatistics) -> None:
        for name in block.names:
            s = block.layers[name]
            side = {k: v for k, v in s.matrices(GRADIENT_SIDE).items() if v is not None}
            if self.gradients and side:
                self.spill.put(f"gradients.{name}", side)
            if self.weights and s.token_weights is not None:
                self.spill.put(f"weights.{name}", {str(j): w for j, w in enumerate(s.token_weights)})
        if self.fisher and block.output_fisher is not None:
            self.spill.put(f"output_fisher.{block.index}", {"F": block.output_fisher})
            self.fishers.add(block.index)


def _known(target: Target, recipe: Recipe, ratio: float) -> dict[str, Form]:
    """The forms of ranks known up front (none at ratio 0: every layer as it is)."""
    return target.forms_of(recipe.ranks(target.shapes, {}, ratio) if ratio > 0 else
                           dict.fromkeys(target.layers))


# ---------------------------------------------------------------- one-shot

class Oneshot(_Plan):
    """The one-shot cut (module docstring), then, when anything is rounded, the rounding
    walk anchored to the float cut."""

    def __init__(self, recipe: Recipe, target: Target, work: Work, ratio: float, fitness,
                 calib, originals):
        self.recipe, self.target, self.work, self.calib = recipe, target, work, calib
        rounds = recipe.budget.rounds
        # the rounding walk reads each token's weight, and each layer's gradient side to
        # price what rounding its factors changed
        self.parking = _Parking(work.spill, gradients=bool(recipe.metric.gradients),
                                weights=True, fisher=False) if rounds else None
        self.chooser = Parked(recipe, target, work, ratio, fitness) \
            if recipe.allocation.needs_spectra and ratio > 0 else \
            Known(_known(target, recipe, ratio))
        self.wants = recipe.wants(work.seed, token_weights=rounds)

    def block(self, block: BlockStatistics) -> None:
        if self.parking:
            self.parking.block(block)
        if isinstance(self.chooser, Parked):
            self.chooser.block(block)
            return
        target, forms = self.target, self.chooser.forms
        wanted = [n for n in block.names if forms[n].factored and target.needs_fit(n, forms[n])]
        problem = lambda n: target.problem(n, block.layers.get(n), self.work)      # noqa: E731
        solved = self.work.solve(target, wanted, problem, {n: forms[n].rank for n in wanted})
        for name, (spectrum, _, B, A) in solved.items():
            target.put_factors(name, forms[name], B, A, spectrum)

    def finish(self) -> Outcome:
        forms, searched = self.chooser.chosen()
        if isinstance(self.chooser, Parked):
            for name, form in forms.items():
                if form.factored and self.target.needs_fit(name, form):
                    self.target.put_factors(name, form, *self.chooser.parked(name, form.rank),
                                            self.chooser.spectra[name])
        outcome = Outcome(searched)
        if self.recipe.budget.rounds:        # the layers as the cut left them, rounded
            outcome.refinement = StreamPass(
                self.recipe, self.target, self.work,
                self.target.forms_of(dict.fromkeys(self.target.layers)), self.calib,
                _copy_reference, fisher=set(), refine=False).run()
        return outcome


def _copy_reference(k: int, block: nn.Module) -> nn.Module:
    return copy.deepcopy(block)


# ---------------------------------------------------------------- anchored

class Anchored(_Plan):
    """The anchored cut (module docstring)."""

    def __init__(self, recipe: Recipe, target: Target, work: Work, ratio: float | None,
                 fitness, calib, originals, measurement: Measurement | None = None):
        c, metric = recipe.config, recipe.metric
        self.recipe, self.target, self.work = recipe, target, work
        self.calib, self.originals, self.measurement = calib, originals, measurement
        priced = recipe.budget.prices_forms
        if priced:
            self.choice = Priced(recipe, target, work, measurement, calib)
        elif recipe.allocation.needs_spectra and ratio > 0:
            self.choice = Parked(recipe, target, work, ratio, fitness, park=fitness is not None)
        else:
            self.choice = Known(_known(target, recipe, ratio))
        self.refines = c.refine_steps > 0 and recipe.budget.cuts(ratio)
        fisher = self.refines and metric.gradients == "full"        # else plain squares
        rounds = recipe.budget.rounds
        self.parking = _Parking(work.spill, gradients=bool(metric.gradients), weights=rounds,
                                fisher=fisher)
        measured = not isinstance(self.choice, Known)
        self.wants = None if measurement is not None and measurement.filled else \
            recipe.wants(work.seed, inputs=measured and metric.inputs, output_fisher=fisher,
                         both_sides=priced, weighted_inputs=priced, token_weights=rounds,
                         held_out=priced)

    def block(self, block: BlockStatistics) -> None:
        self.choice.block(block)
        self.parking.block(block)

    def finish(self) -> Outcome:
        forms, searched = self.choice.chosen()
        fishers, parked = self.parking.fishers, None
        if self.measurement is not None:
            if self.wants is not None:           # this compression filled it
                self.measurement.fishers = fishers
            fishers, parked = self.measurement.fishers, Kept(self.measurement.spill)
        refinement = StreamPass(self.recipe, self.target, self.work, forms, self.calib,
                                self._reference, fishers, self.refines, parked).run()
        return Outcome(searched, refinement)

    def _reference(self, k: int, block: nn.Module) -> nn.Module:
        """The dense block k: a copy of the block before its cut, with the layers as
        compress_ found them when an earlier cut has replaced them."""
        ref = copy.deepcopy(block)
        if self.originals is not None:
            self.originals.restore(ref, block, self.target.model, self.work.device)
        return ref


class Originals:
    """The targeted layers as compress_ found them, parked on disk: the dense reference of
    the anchored cuts after the first (when the model holds their earlier cuts)."""

    def __init__(self, model: nn.Module, names: list[str], spill: Spill):
        self.spill, self.skeletons = spill, {}
        for name in names:
            layer = model.get_submodule(name)
            spill.put(f"original.{name}", layer.state_dict())
            self.skeletons[name] = copy.deepcopy(layer).to("meta")

    def restore(self, ref: nn.Module, block: nn.Module, model: nn.Module, device) -> None:
        """Put the original layers of `block` (a block of `model`) into its copy `ref`."""
        within = {id(m): n for n, m in block.named_modules()}
        for name, module in model.named_modules():
            if id(module) in within and name in self.skeletons:
                layer = copy.deepcopy(self.skeletons[name]).to_empty(device=device)
                layer.load_state_dict(self.spill.read(f"original.{name}"))
                set_module(ref, within[id(module)], layer)


PLANS = {"oneshot": Oneshot, "anchored": Anchored}       # keyed by config.CUTS' names
assert set(PLANS) == set(CUTS), "every cut the config offers has its plan"


def plan_for(recipe: Recipe, target: Target, work: Work, ratio: float | None, fitness, calib,
             originals, measurement: Measurement | None = None) -> _Plan:
    """The one plan a cut takes, by the config's cut (a measurement: --bits only, which
    takes the anchored cut)."""
    if measurement is not None:
        if not recipe.budget.prices_forms:
            raise RankwiseError("a measurement keeps the prices of a --bits compression; "
                                "give --bits")
        return Anchored(recipe, target, work, ratio, fitness, calib, originals, measurement)
    return PLANS[recipe.config.cut](recipe, target, work, ratio, fitness, calib, originals)
