"""Rank allocation under one global parameter budget over the targeted layers."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import RankwiseError
from ..models.layers import dense_params, max_useful_rank, params_at

TILE, TILE_FROM = 64, 1024     # rank_multiple 0: ranks in steps of 64 from 1024 wide


def rank_multiples(shapes: dict[str, tuple[int, int]], rank_multiple: int) -> dict[str, int]:
    """Each layer's rank step: `rank_multiple`, or for 0 (auto) 64 where the layer's smaller
    side is at least 1024 and 1 below. A GPU's matmul kernels work in tiles of 64 or 128,
    so a rank of 172 pays for 192 or 256; from 1024 wide a step of 64 is at most 1/16 of the
    side, and narrower layers (the 135M's 576) keep exact ranks, where a step of 64 would
    cost quality for speed a small model does not need."""
    if rank_multiple:
        return {name: rank_multiple for name in shapes}
    return {name: TILE if min(shape) >= TILE_FROM else 1 for name, shape in shapes.items()}


def _per_layer(shapes, multiple: int | dict[str, int]) -> dict[str, int]:
    return multiple if isinstance(multiple, dict) else {name: multiple for name in shapes}


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float,
                  multiple: int | dict[str, int] = 1) -> dict[str, int | None]:
    """Every layer loses the same fraction `ratio` of its parameters (rounded down to a
    whole rank, or a whole multiple of its `multiple`, so the achieved ratio is at least
    the requested one). None = keep dense."""
    step = _per_layer(shapes, multiple)
    ranks = {}
    for name, (m, n) in shapes.items():
        top = max_useful_rank(m, n)
        r = min(int((1 - ratio) * m * n // (m + n)), top) // step[name] * step[name]
        ranks[name] = r or (step[name] if step[name] <= max(top, 1) else None)
    budget = (1 - ratio) * sum(dense_params(m, n) for m, n in shapes.values())
    while kept_params(shapes, ranks) > budget:     # layers rounded up to one multiple
        name = max((k for k, r in ranks.items() if r and r > step[k]),
                   key=lambda k: ranks[k] * sum(shapes[k]), default=None)
        if name is None:
            raise RankwiseError(f"ratio {ratio} cannot be reached with ranks that are "
                                f"multiples of {sorted(set(step.values()))}")
        ranks[name] -= step[name]
    return ranks


def apply_rank_pattern(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]],
                       rank_pattern: dict[str, int]) -> dict[str, int | None]:
    """Explicit {regex: rank} overrides; the first matching pattern wins; a rank that would
    not save parameters keeps the layer dense."""
    out = dict(ranks)
    for name in ranks:
        for pattern, rank in rank_pattern.items():
            if re.search(pattern, name):
                m, n = shapes[name]
                out[name] = rank if rank <= max_useful_rank(m, n) else None
                break
    return out


def kept_params(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> int:
    return sum(params_at(shape, ranks.get(k)) for k, shape in shapes.items())


def achieved_ratio(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> float:
    return 1 - kept_params(shapes, ranks) / sum(dense_params(m, n) for m, n in shapes.values())


def spectrum_ranks(shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor],
                   ratio: float, min_rank: int = 1,
                   multiple: int | dict[str, int] = 1) -> dict[str, int | None]:
    """Global allocation from the per-direction loss spectra (descending, per layer).

    Each layer's options are "dense" (no loss, m*n parameters) and every useful rank r >=
    min_rank (loss = the sum of the dropped spectrum, r*(m+n) parameters), so a layer that
    saves nothing until its rank falls below mn/(m+n) is handled exactly; `knapsack`
    chooses one per layer within the budget. The spectra must be in the same units for
    every layer (unnormalised statistics over the same tokens). With `multiple` > 1 (one
    for all, or {layer: multiple}) a layer chooses among ranks that are multiples of its
    own (kernel-friendly shapes).
    """
    budget = (1 - ratio) * sum(dense_params(m, n) for m, n in shapes.values())
    step = _per_layer(shapes, multiple)
    names, options = list(shapes), []
    for name in names:
        (m, n), s = shapes[name], spectra[name].detach().to("cpu", torch.float64).clamp_min(0)
        tail = torch.cat([s.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        low = -(-max(min_rank, 1) // step[name]) * step[name]
        ranks = list(range(low, max_useful_rank(m, n) + 1, step[name]))
        options.append(([None, *ranks],
                        torch.tensor([m * n] + [r * (m + n) for r in ranks], dtype=torch.float64),
                        torch.cat([torch.zeros(1, dtype=torch.float64), tail[ranks]])))
    try:
        chosen = knapsack([costs for _, costs, _ in options], [prices for *_, prices in options],
                          budget)
    except _OverBudget:
        raise RankwiseError(f"ratio {ratio} cannot be reached with at least rank {min_rank} "
                            "in every layer") from None
    return {name: ranks[i] for name, (ranks, _, _), i in zip(names, options, chosen)}


class _OverBudget(Exception):
    pass


def knapsack(costs: list[torch.Tensor], prices: list[torch.Tensor], budget: float) -> list[int]:
    """One option per layer (an index into its costs and prices) with the least summed
    price whose summed cost is within `budget`: the multiple-choice knapsack every
    allocation here solves (parameters against spectra, bits against priced forms).

    Lagrangian relaxation: for a price `lam` per unit of cost each layer takes the option
    minimising price + lam * cost; `lam` is bisected (on a log scale) to the largest spend
    within the budget; the leftover is then spent greedily, each time on the change of one
    layer's option that saves the most price per unit of cost and still fits. Raises
    _OverBudget when even the cheapest options exceed the budget."""
    width = max(c.numel() for c in costs)
    pad = lambda ts: torch.stack([torch.cat([t.to(torch.float64),      # noqa: E731
                                             torch.full((width - t.numel(),), torch.inf,
                                                        dtype=torch.float64)]) for t in ts])
    cost, price = pad(costs), pad(prices)
    rows = torch.arange(len(costs))

    def choose(log_lam: float) -> torch.Tensor:
        total = price + 10.0 ** log_lam * cost
        return torch.where(torch.isnan(total), torch.inf, total).argmin(1)

    def spend(choice: torch.Tensor) -> float:
        return float(cost[rows, choice].sum())

    lo, hi = -100.0, 100.0              # spend falls as lam grows
    if spend(choose(hi)) > budget:
        raise _OverBudget
    for _ in range(100):
        mid = (lo + hi) / 2
        if spend(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
    choice = choose(hi)
    leftover = budget - spend(choice)
    while True:
        extra = cost - cost[rows, choice][:, None]
        saved = price[rows, choice][:, None] - price
        fits = (extra > 0) & (saved > 0) & (extra <= leftover)
        if not fits.any():
            return choice.tolist()
        rate = torch.where(fits, saved / extra.clamp_min(1e-300), -torch.inf)
        best = int(rate.flatten().argmax())
        layer, option = divmod(best, width)
        leftover -= float(extra[layer, option])
        choice[layer] = option


def forms_within_bits(menus: dict, setting, bits: float, rank_steps: dict[str, int],
                      min_rank: int = 1) -> dict:
    """Every layer's form (rankwise.forms.registry) for a budget of `bits` stored bits per original
    parameter of these layers: `knapsack` over the forms each menu (rankwise.forms.pricing)
    offers, their stored bits against their prices."""
    names = list(menus)
    options = [menus[n].options(setting, rank_steps[n], min_rank) for n in names]
    check_within_bits(menus, options, bits)
    chosen = knapsack([costs for _, costs, _ in options], [prices for *_, prices in options],
                      bits * sum(m * n for m, n in (menus[name].shape for name in names)))
    return {name: forms[i] for name, (forms, _, _), i in zip(names, options, chosen)}


def check_within_bits(menus: dict, options: list, bits: float) -> None:
    """One sentence when no choice of these options meets the budget (what a layer's
    options cost is known from its shape: rankwise.forms.pricing.unmeasured)."""
    for name, (forms, _, _) in zip(menus, options):
        if not forms:
            raise RankwiseError(f"{name} can take none of the forms offered (a layer that is "
                                "low-rank factors can only stay factors: offer lowrank in "
                                "--forms, at widths the serving target runs)")
    dense = sum(m * n for m, n in (menu.shape for menu in menus.values()))
    least = sum(float(costs.min()) for _, costs, _ in options) / dense
    if least > bits:
        raise RankwiseError(f"bits {bits} is below the smallest model these forms make "
                            f"({least:.3f} bits per parameter); give more bits")


@dataclass(frozen=True)
class Allocation:
    """An allocation: its own `choose(shapes, spectra, ratio, min_rank, multiple) -> ranks`
    (None = keep dense), whether that needs every layer's spectrum first, and whether the
    evolutionary search then refines it against the dense model."""
    name: str
    choose: Callable[..., dict[str, int | None]]
    needs_spectra: bool
    searched: bool
    help: str


def _uniform(shapes, spectra, ratio, min_rank=1, multiple=1):
    return uniform_ranks(shapes, ratio, multiple)


ALLOCATIONS = {a.name: a for a in (
    Allocation("uniform", _uniform, False, False,
               "every layer loses the same fraction of its parameters"),
    Allocation("spectrum", spectrum_ranks, True, False,
               "one global budget spent where the metric's spectra predict the least loss "
               "per parameter; some layers may stay dense"),
    Allocation("search", spectrum_ranks, True, True,
               "evolutionary search seeded from spectrum, fitness = KL to the dense model on "
               "held-out calibration windows"),
)}
