"""How a cut chooses every layer's form, as its first walk's blocks arrive (`block`) and at
the end (`chosen`), one way per budget:

  Parked     a ratio's ranks from every layer's spectrum: spectra kept, factors parked on
             disk up to each layer's cap (or not at all: spectra only), allocated (and
             searched against the dense model) at the end;
  Known      ranks known up front (uniform, explicit, or none: rounding only);
  Priced     a budget in bits: every layer's menu of forms priced as its block's
             statistics arrive (rankwise.forms.pricing), or taken from a filled
             Measurement; one knapsack over all of them at the end.
"""
from __future__ import annotations

import torch

from ..errors import RankwiseError
from ..forms import allocate
from ..forms.pricing import HeldOut, Menu, Pricing, unmeasured
from ..forms.registry import Form
from ..models.layers import LowRankLinear, linear_weight
from ..pipeline.spill import Spill
from ..pipeline.walk import BlockStatistics
from ..serving.engines import ENGINES
from .search import Budget, Fitness, SearchResult, SearchSettings, search_ranks
from .surgery import Recipe, Target, Work


class Parked:
    """Ranks from every layer's spectrum (module docstring); `park=False` keeps spectra only."""

    def __init__(self, recipe: Recipe, target: Target, work: Work, ratio: float, fitness,
                 park: bool = True):
        self.recipe, self.target, self.work = recipe, target, work
        self.ratio, self.fitness, self.park = ratio, fitness, park
        self.spectra: dict[str, torch.Tensor] = {}

    def block(self, block: BlockStatistics) -> None:
        target = self.target
        problem = lambda n: target.problem(n, block.layers.get(n), self.work)      # noqa: E731
        caps = {n: target.cap(n) for n in block.names} if self.park else None
        self.work.decompose(target, block.names, problem, caps, self._keep, self.work.overlap)

    def _keep(self, solved: dict) -> None:
        for name, (spectrum, _, *factors) in solved.items():
            self.spectra[name] = spectrum
            if factors:
                B, A = factors
                self.work.spill.put(f"factors.{name}", {"B_t": B.T, "A": A})

    def chosen(self) -> tuple[dict[str, Form], SearchResult | None]:
        """The allocation's forms, refined by the search when it runs."""
        self.work.overlap.drain()
        ranks = self.recipe.ranks(self.target.shapes, self.spectra, self.ratio)
        searched = None
        if self.fitness is not None:
            searched = self._search(ranks)
            ranks = searched.ranks
        return self.target.forms_of(ranks), searched

    def parked(self, name: str, rank: int):
        """(B, A) of rank `rank` from a layer's parked factors (only those rows are read)."""
        spill = self.work.spill
        return (spill.get(f"factors.{name}", "B_t", rank).T,
                spill.get(f"factors.{name}", "A", rank))

    def _search(self, ranks) -> SearchResult:
        target, c = self.target, self.recipe.config
        caps = {k: l.rank for k, l in target.layers.items() if isinstance(l, LowRankLinear)}
        return search_ranks(target.model, target.layers, self.parked, ranks,
                            Fitness(*self.fitness),
                            Budget(target.shapes, caps, c.min_rank,
                                   self.recipe.rank_steps(target.shapes)),
                            SearchSettings(c.search_generations, c.search_offspring,
                                           seconds=c.search_seconds, seed=self.work.seed,
                                           progress=self.work.route.progress))


class Known:
    """Forms known up front."""

    def __init__(self, forms: dict[str, Form]):
        self.forms = forms

    def block(self, block: BlockStatistics) -> None:
        pass

    def chosen(self) -> tuple[dict[str, Form], None]:
        return self.forms, None


class Measurement:
    """The first walk of a --bits compression, kept to make more budgets from: every
    layer's menu (rankwise.forms.pricing) and what the two-stream walk reads (gradient
    sides, token weights, output Fishers), parked in the measurement's own spill and never
    let go. The first compress_ given an empty one fills it; each later one skips the walk.
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
        if sorted(names) != sorted(self.menus) or not torch.equal(calib, self.calib) or \
                not self.pricing.covers(pricing):
            raise RankwiseError("this measurement was made for other layers, windows or forms; "
                                "measure again (a new Measurement) for this recipe")

    def close(self) -> None:
        self.spill.close()

    def __enter__(self) -> "Measurement":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Priced:
    """A budget in bits (module docstring)."""

    def __init__(self, recipe: Recipe, target: Target, work: Work,
                 measurement: Measurement | None, calib):
        c = recipe.config
        self.recipe, self.target, self.work = recipe, target, work
        self.measurement, self.calib = measurement, calib
        self.setting = Pricing.of(c.forms, c.weight_bits, c.group_size, c.rounding,
                                  recipe.scale_dtype, c.damping,
                                  ENGINES.get(c.serve))
        self.menus: dict[str, Menu] = {}
        if measurement is not None and measurement.filled:
            measurement.check(self.setting, list(target.layers), calib)
            self.menus = measurement.menus
        self._check_feasible()

    def _check_feasible(self) -> None:
        """Refuse, from the layers' shapes alone, a budget no choice of forms meets."""
        layers, steps = self.target.layers, self.recipe.rank_steps(self.target.shapes)
        menus = {n: unmeasured(shape, self.setting,
                               layers[n].rank if isinstance(layers[n], LowRankLinear) else None,
                               layers[n].bias is not None)
                 for n, shape in self.target.shapes.items()}
        allocate.check_within_bits(menus, [m.options(self.setting, steps[n],
                                                     self.recipe.config.min_rank)
                                           for n, m in menus.items()], self.recipe.budget.bits)

    def block(self, block: BlockStatistics) -> None:
        layers, work = self.target.layers, self.work
        factored = {n: layers[n].rank if isinstance(layers[n], LowRankLinear) else None
                    for n in block.names}
        biased = {n: layers[n].bias is not None for n in block.names}

        def problem(name):
            s, device = block.layers[name], work.device
            held, W = s.held_out, work.to_device(linear_weight(layers[name]).detach())
            if held is None:
                return (W, s.grad_cov.to(device), s.input_cov.to(device),
                        s.weighted_cov.to(device) if s.weighted_cov is not None else None, None)
            rest = lambda every, out: (every - out).to(device)      # noqa: E731
            return (W, rest(s.grad_cov, held.grad_cov), rest(s.input_cov, held.input_cov),
                    rest(s.weighted_cov, held.weighted_cov) if s.weighted_cov is not None else None,
                    HeldOut(held.grad_cov.to(device), held.input_cov.to(device),
                            (s.tokens / held.tokens) ** 2))
        work.solver.menus(block.names, problem, self.target.shapes, self.setting, factored,
                          biased, self.menus.update, work.overlap)

    def chosen(self) -> tuple[dict[str, Form], None]:
        self.work.overlap.drain()
        if self.measurement is not None and not self.measurement.filled:
            self.measurement.menus, self.measurement.pricing = self.menus, self.setting
            self.measurement.calib = self.calib
        forms = allocate.forms_within_bits(self.menus, self.setting, self.recipe.budget.bits,
                                           self.recipe.rank_steps(self.target.shapes),
                                           self.recipe.config.min_rank)
        self.target.made.priced.update({name: self.menus[name].price(form)
                                        for name, form in forms.items()})
        return forms, None
