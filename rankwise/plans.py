"""How a cut goes, one plan per cut (config.CUTS names them): what the statistics walk must
collect (`wants`), what to do with a block's statistics as they arrive (`block`), and what
to do at the end (`finish`). The walks only move data; the plans decide.

  oneshot   every layer projected from the dense model's statistics. Ranks known up front
            (uniform, explicit) are cut as each block's statistics arrive; ranks from
            every layer's spectrum (spectrum, search) are chosen at the end, from factors
            parked on disk (rankwise.pipeline.spill) until the allocation, and the search,
            have seen them all.
  anchored  a first walk measures what the allocation needs (the spectra, or every form's
            price: rankwise.pricing) and parks what the cut will need (each layer's
            gradient side, each block's output Fisher, each token's weight for rounding);
            then the two-stream walk (rankwise.pipeline.streams) cuts block by block on
            the compressed stream: each group of layers fitted to reproduce the dense
            model's outputs (geometry.anchored), each block's factors and corrections
            refined toward the dense block's output (rankwise.train.refine).
Rounding (rankwise.rounding) always rides a two-stream walk, so each block is rounded on
the inputs the already-rounded blocks give it and its outputs passed on: a weight to round
is rounded when its group's inputs arrive, from the anchored target in the
token-weighted covariance of those inputs; factors to round after the block's refinement,
in the covariance of their inputs on the refined block. After a one-shot cut that rounds,
a second walk does only that, anchored to the float cut.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import allocate
from .config import CUTS
from .errors import RankwiseError
from .cut import Cut
from .forms import Form
from .layers import LowRankLinear, linear_shape, linear_weight, set_module
from .pipeline.spill import Spill
from .pipeline.walk import BlockStatistics, Wants
from .pricing import Menu, Pricing
from .search import Budget, Fitness, SearchResult, SearchSettings, search_ranks
from .stats import GRADIENT_SIDE
from .stream_cut import Kept, StreamPass


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

    def __init__(self, cut: Cut, gradients: bool, weights: bool, fisher: bool):
        self.cut, self.gradients, self.weights, self.fisher = cut, gradients, weights, fisher
        self.fishers: set[int] = set()

    def block(self, block: BlockStatistics) -> None:
        spill = self.cut.route.spill
        for name in block.names:
            s = block.layers[name]
            side = {k: v for k, v in s.matrices(GRADIENT_SIDE).items() if v is not None}
            if self.gradients and side:
                spill.put(f"gradients.{name}", side)
            if self.weights and s.token_weights is not None:
                spill.put(f"weights.{name}", {str(j): w for j, w in enumerate(s.token_weights)})
        if self.fisher and block.output_fisher is not None:
            spill.put(f"output_fisher.{block.index}", {"F": block.output_fisher})
            self.fishers.add(block.index)


# ---------------------------------------------------------------- one-shot

class Immediate(_Plan):
    """Ranks known up front: each block is cut as soon as its statistics arrive."""

    def __init__(self, cut: Cut, forms: dict[str, Form], parking: _Parking | None):
        self.cut, self.forms, self.parking = cut, forms, parking
        self.wants = cut.wants(token_weights=parking is not None)

    def block(self, block: BlockStatistics) -> None:
        cut = self.cut
        if self.parking:
            self.parking.block(block)
        wanted = [n for n in block.names if self.forms[n].factored and
                  cut.needs_fit(n, self.forms[n])]
        problem = lambda n: cut.problem(n, block.layers.get(n))      # noqa: E731
        ranks = {n: self.forms[n].rank for n in wanted}
        for name, (spectrum, _, B, A) in cut.solve(wanted, problem, ranks).items():
            cut.put_factors(name, self.forms[name], B, A, spectrum)

    def finish(self) -> Outcome:
        return Outcome()


class Parked(_Plan):
    """Ranks from every layer's spectrum: spectra kept, factors parked on disk up to each
    layer's cap (or not at all, `park=False`: spectra only), allocated (and searched) at
    the end, then cut from the parked rows."""

    def __init__(self, cut: Cut, ratio: float, fitness, parking: _Parking | None = None,
                 park: bool = True):
        self.cut, self.ratio, self.fitness, self.park = cut, ratio, fitness, park
        self.parking = parking
        self.spectra: dict[str, torch.Tensor] = {}
        self.wants = cut.wants(token_weights=parking is not None and parking.weights)

    def block(self, block: BlockStatistics) -> None:
        cut = self.cut
        if self.parking:
            self.parking.block(block)
        problem = lambda n: cut.problem(n, block.layers.get(n))      # noqa: E731
        caps = {n: cut.cap(n) for n in block.names} if self.park else None
        cut.decompose(block.names, problem, caps, self._keep, cut.overlap)

    def _keep(self, solved: dict) -> None:
        for name, (spectrum, _, *factors) in solved.items():
            self.spectra[name] = spectrum
            if factors:
                B, A = factors
                self.cut.route.spill.put(f"factors.{name}", {"B_t": B.T, "A": A})

    def chosen(self) -> tuple[dict[str, Form], SearchResult | None]:
        """The allocation's forms, refined by the search when it runs."""
        self.cut.overlap.drain()
        ranks = self.cut.ranks(self.spectra, self.ratio)
        searched = None
        if self.fitness is not None:
            searched = self._search(ranks)
            ranks = searched.ranks
        return self.cut.forms_of(ranks), searched

    def finish(self) -> Outcome:
        forms, searched = self.chosen()
        for name, form in forms.items():
            if form.factored and self.cut.needs_fit(name, form):
                self.cut.put_factors(name, form, *self._parked(name, form.rank),
                                     self.spectra[name])
        return Outcome(searched)

    def _parked(self, name: str, rank: int):
        """(B, A) of rank `rank` from a layer's parked factors (only those rows are read)."""
        spill = self.cut.route.spill
        return (spill.get(f"factors.{name}", "B_t", rank).T,
                spill.get(f"factors.{name}", "A", rank))

    def _search(self, ranks) -> SearchResult:
        cut, c = self.cut, self.cut.config
        caps = {k: l.rank for k, l in cut.layers.items() if isinstance(l, LowRankLinear)}
        return search_ranks(cut.model, cut.layers, self._parked, ranks, Fitness(*self.fitness),
                            Budget(cut.shapes, caps, c.min_rank, cut.rank_steps()),
                            SearchSettings(c.search_generations, c.search_offspring,
                                           seconds=c.search_seconds, seed=cut.seed,
                                           progress=cut.route.progress))


class Oneshot(_Plan):
    """The one-shot cut (module docstring), then, when anything is rounded, the rounding
    walk anchored to the float cut."""

    def __init__(self, cut: Cut, ratio: float, fitness, calib, originals):
        rounds = cut.config.rounds
        parking = _Parking(cut, gradients=False, weights=True, fisher=False) if rounds else None
        if cut.allocation.needs_spectra and ratio > 0:
            self.inner = Parked(cut, ratio, fitness, parking)
        else:
            forms = cut.forms_of(cut.ranks({}, ratio) if ratio > 0 else
                                 dict.fromkeys(cut.layers))
            self.inner = Immediate(cut, forms, parking)
        self.cut, self.calib, self.wants = cut, calib, self.inner.wants

    def block(self, block: BlockStatistics) -> None:
        self.inner.block(block)

    def finish(self) -> Outcome:
        outcome = self.inner.finish()
        if self.cut.config.rounds:        # the layers as the cut left them, rounded
            StreamPass(self.cut, self.cut.forms_of(dict.fromkeys(self.cut.layers)), self.calib,
                       _copy_reference, fisher=set(), refine=False).run(outcome)
        return outcome


def _copy_reference(k: int, block: nn.Module) -> nn.Module:
    return copy.deepcopy(block)


# ---------------------------------------------------------------- anchored

class Measurement:
    """The first walk of a --bits compression, kept to make more budgets from: every
    layer's menu (rankwise.pricing) and what the two-stream walk reads (gradient sides,
    token weights, output Fishers), parked in the measurement's own spill and never let
    go. The first compress_ given an empty one fills it; each later one skips the walk.
    Later ones must compress the same dense model (a fresh copy) on the same windows with
    the same recipe; --bits may differ, and --forms may offer fewer forms than were priced.
    `with Measurement() as m:` lets the spill go."""

    def __init__(self, scratch: str | None = None):
        self.spill = Spill(scratch)
        self.menus: dict[str, Menu] = {}
        self.fishers: set[int] = set()
        self.pricing: Pricing | None = None
        self.calib: torch.Tensor | None = None

    @property
    def filled(self) -> bool:
        return bool(self.menus)

    def check(self, pricing: Pricing, names: list[str], calib) -> None:
        """One sentence when a compression cannot be made from this measurement."""
        offered = [(pricing.rounded_bits, self.pricing.rounded_bits),
                   (pricing.corrected_bits, self.pricing.corrected_bits),
                   (pricing.factor_bits, self.pricing.factor_bits)]
        if sorted(names) != sorted(self.menus) or not torch.equal(calib, self.calib) or \
                any(not set(asked) <= set(priced) for asked, priced in offered) or \
                (pricing.group_size, pricing.rounding) != \
                (self.pricing.group_size, self.pricing.rounding):
            raise RankwiseError("this measurement was made for other layers, windows or forms; "
                                "measure again (a new Measurement) for this recipe")

    def close(self) -> None:
        self.spill.close()

    def __enter__(self) -> "Measurement":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Priced:
    """The bits budget's choice: every layer's menu of forms priced as its block's
    statistics arrive (rankwise.pricing), or taken from a filled measurement; one knapsack
    over all of them at the end."""

    def __init__(self, cut: Cut, measurement: Measurement | None, calib):
        c = cut.config
        self.cut, self.measurement, self.calib = cut, measurement, calib
        self.setting = Pricing.of(c.forms, c.weight_bits, c.group_size, c.rounding,
                                  cut.scale_dtype, c.damping)
        self.menus: dict[str, Menu] = {}
        if measurement is not None and measurement.filled:
            measurement.check(self.setting, list(cut.layers), calib)
            self.menus = measurement.menus

    def block(self, block: BlockStatistics) -> None:
        cut, device = self.cut, self.cut.route.placement.device
        factored = {n: cut.layers[n].rank if isinstance(cut.layers[n], LowRankLinear) else None
                    for n in block.names}

        def problem(name):
            s = block.layers[name]
            return (cut.route.placement.to_device(linear_weight(cut.layers[name]).detach()),
                    s.grad_cov.to(device), s.input_cov.to(device),
                    s.weighted_cov.to(device) if s.weighted_cov is not None else None)
        cut.solver.menus(block.names, problem, cut.shapes, self.setting, factored,
                         self.menus.update, cut.overlap)

    def chosen(self) -> tuple[dict[str, Form], None]:
        self.cut.overlap.drain()
        if self.measurement is not None and not self.measurement.filled:
            self.measurement.menus, self.measurement.pricing = self.menus, self.setting
            self.measurement.calib = self.calib
        forms = allocate.forms_within_bits(self.menus, self.setting, self.cut.config.bits,
                                           self.cut.rank_steps(), self.cut.config.min_rank)
        self.cut.made.priced.update({name: self.menus[name].price(form)
                                     for name, form in forms.items()})
        return forms, None


class _Known:
    def __init__(self, forms: dict[str, Form]):
        self.forms = forms

    def block(self, block: BlockStatistics) -> None:
        pass

    def chosen(self):
        return self.forms, None


class Anchored(_Plan):
    """The anchored cut (module docstring)."""

    def __init__(self, cut: Cut, ratio: float | None, fitness, calib, originals,
                 measurement: Measurement | None = None):
        c = cut.config
        self.cut, self.calib, self.originals = cut, calib, originals
        self.measurement = measurement
        bits = c.bits is not None
        if bits:
            self.choice = _Priced(cut, measurement, calib)
        elif cut.allocation.needs_spectra and ratio > 0:
            self.choice = Parked(cut, ratio, fitness, park=fitness is not None)
        else:
            self.choice = _Known(cut.forms_of(cut.ranks({}, ratio) if ratio > 0 else
                                              dict.fromkeys(cut.layers)))
        self.refines = c.refine_steps > 0 and (bits or ratio > 0)     # something was cut
        fisher = self.refines and cut.metric.gradients == "full"        # else plain squares
        self.parking = _Parking(cut, gradients=bool(cut.metric.gradients), weights=c.rounds,
                                fisher=fisher)
        measured = not isinstance(self.choice, _Known)
        self.wants = None if measurement is not None and measurement.filled else \
            cut.wants(inputs=measured and cut.metric.inputs, output_fisher=fisher,
                      both_sides=bits, weighted_inputs=bits, token_weights=c.rounds)

    def block(self, block: BlockStatistics) -> None:
        self.choice.block(block)
        self.parking.block(block)

    def finish(self) -> Outcome:
        forms, searched = self.choice.chosen()
        outcome = Outcome(searched)
        fishers, parked = self.parking.fishers, None
        if self.measurement is not None:
            if self.wants is not None:           # this compression filled it
                self.measurement.fishers = fishers
            fishers, parked = self.measurement.fishers, Kept(self.measurement.spill)
        StreamPass(self.cut, forms, self.calib, self._reference, fishers, self.refines,
                   parked).run(outcome)
        return outcome

    def _reference(self, k: int, block: nn.Module) -> nn.Module:
        """The dense block k: a copy of the block before its cut, with the layers as
        compress_ found them when an earlier cut has replaced them."""
        ref = copy.deepcopy(block)
        if self.originals is not None:
            self.originals.restore(ref, block, self.cut.model, self.cut.route.placement.device)
        return ref


class _Originals:
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


def plan_for(cut: Cut, ratio: float | None, fitness, calib, originals,
             measurement: Measurement | None = None) -> _Plan:
    """The one plan a cut takes, by the config's cut (a measurement: --bits only, which
    takes the anchored cut)."""
    if measurement is not None:
        if cut.config.bits is None:
            raise RankwiseError("a measurement keeps the prices of a --bits compression; "
                                "give --bits")
        return Anchored(cut, ratio, fitness, calib, originals, measurement)
    return PLANS[cut.config.cut](cut, ratio, fitness, calib, originals)
