"""A block's decompositions and prices, spread over the processes and shared.

Under torchrun a block's layer j is solved by process j mod world (each forms only its own
problems) and every result is broadcast from its owner, so every process holds all of them
after the same collectives in the same order; one process does them all. The solving may
run beside the walk (rankwise.pipeline.overlap); the problems are formed when handed over,
so they hold the weights and statistics as they are then, whatever the walk does next.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from .. import geometry
from ..forms import pricing
from ..pipeline.overlap import Inline
from ..pipeline.walk import Route

log = logging.getLogger(__name__)

# (shape, dtype, device) of each tensor a result is made of, as the others receive it
Specs = list[tuple[tuple[int, ...], torch.dtype, object]]


class Solver:
    """What a compression solves: decompositions (spectra, factors of a given rank) and
    prices (rankwise.forms.pricing), each a list of tensors per layer."""

    def __init__(self, route: Route, damping: float):
        self.route, self.damping = route, damping

    def spread(self, names: list[str], problem: Callable[[str], object],
               solve: Callable[[list[str], list], dict[str, list[torch.Tensor]]],
               specs: Callable[[str], Specs], then: Callable[[dict], None],
               overlap=Inline()) -> None:
        """This process's share of `names` formed (problem) and solved (solve: names,
        problems -> {name: tensors}) by `overlap`; every layer's result, broadcast from its
        owner, handed to `then` in this thread."""
        comm = self.route.comm
        mine = names[comm.rank::comm.size]
        problems = [problem(n) for n in mine]
        overlap.submit(lambda: solve(mine, problems),
                       lambda done: then(self._shared(names, done, specs)))

    def _shared(self, names: list[str], mine: dict, specs) -> dict[str, list[torch.Tensor]]:
        comm, out = self.route.comm, {}
        for j, name in enumerate(names):
            owner, have = j % comm.size, mine.get(name)
            out[name] = [comm.broadcast(have[i] if have is not None else None, shape, dtype,
                                        owner, device)
                         for i, (shape, dtype, device) in enumerate(specs(name))]
        return out

    def decompositions(self, names: list[str], problem, shapes: dict[str, tuple[int, int]],
                       ranks: dict[str, int] | None, dtypes: dict[str, torch.dtype],
                       then: Callable[[dict], None], overlap=Inline()) -> None:
        """{name: [spectrum (CPU), damping the metric's root took (CPU; NaN for none), B, A]}
        of the layers' projection problems (problem(name) = (W, decompose's keyword
        arguments)) to `then`, with factors of rank ranks[name] (ranks None: spectra only,
        from eigenvalues alone); the same-sized ones decomposed in one batch."""
        device = self.route.placement.device

        def specs(name):
            (m, n), k = shapes[name], min(shapes[name])
            out = [((k,), torch.float64, "cpu"), ((1,), torch.float64, "cpu")]
            if ranks is not None and ranks[name] >= 1:
                r = ranks[name]
                out += [((m, r), dtypes[name], device), ((r, n), dtypes[name], device)]
            return out

        self.spread(names, problem, lambda mine, problems: self._decompose(
            mine, problems, ranks, dtypes), specs, then, overlap)

    def solve(self, names, problem, shapes, ranks, dtypes) -> dict[str, list[torch.Tensor]]:
        """`decompositions` at once, the result returned."""
        solved: dict = {}
        self.decompositions(names, problem, shapes, ranks, dtypes, solved.update)
        return solved

    def _decompose(self, mine: list[str], problems: list, ranks, dtypes) -> dict:
        """This process's share of a block's layers decomposed: no collectives, no state."""
        out, before = {}, geometry.EIGH_COUNT.snapshot()
        if ranks is None:      # an allocation's spectra: eigenvalues only
            for name, s in zip(mine, geometry.spectra_many(problems, self.damping)):
                out[name] = [s.values.to("cpu"), _number(s.damping)]
        else:
            for name, d in zip(mine, geometry.decompose_many(problems, self.damping)):
                out[name] = [d.spectrum.to("cpu"), _number(d.damping)]
                if ranks[name] >= 1:
                    out[name] += [t.to(dtypes[name]) for t in d.factors(ranks[name])]
        done = geometry.EIGH_COUNT.since(before)
        if mine:
            log.debug("%d layers from %s: %d eigendecompositions (%d eigenvalues only, %d redone in "
                     "float64) in %.2f s", len(mine), mine[0], done.decompositions,
                     done.values_only, done.float64_redos, done.seconds)
        return out

    def menus(self, names: list[str], problem, shapes: dict[str, tuple[int, int]],
              setting: pricing.Pricing, factored: dict[str, int | None],
              biased: dict[str, bool], then: Callable[[dict], None], overlap=Inline()) -> None:
        """{name: Menu} of the layers (problem(name) = (W, G, C, H, HeldOut or None):
        rankwise.forms.pricing.price's arguments) to `then`."""
        def solve(mine, problems):
            return {name: pricing.price(*p, setting, factored[name]).tensors()
                    for name, p in zip(mine, problems)}

        def specs(name):
            return [(shape, torch.float64, "cpu")
                    for shape in pricing.Menu.layout(shapes[name], setting, factored[name])]

        self.spread(names, problem, solve, specs, lambda done: then({
            name: pricing.Menu.from_tensors(shapes[name], setting, factored[name], tensors,
                                            biased[name])
            for name, tensors in done.items()}), overlap)


def _number(value: float | None) -> torch.Tensor:
    return torch.tensor([float("nan") if value is None else value], dtype=torch.float64)
