"""Rank allocation under one global parameter budget over the targeted layers."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import RankwiseError
from .layers import dense_params, max_useful_rank, params_at


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

    Each layer picks, for a price `lam` per parameter, the option minimising
    predicted loss + lam * parameters among "dense" (no loss, m*n parameters) and every
    useful rank r >= min_rank (loss = sum of the dropped spectrum, r*(m+n) parameters), so a
    layer that saves nothing until its rank falls below mn/(m+n) is handled exactly. `lam` is
    bisected to the largest spend within the budget; the leftover is then spent greedily on
    the directions with the most predicted loss per parameter. The spectra must be in the
    same units for every layer (unnormalised statistics over the same tokens). With
    `multiple` > 1 (one for all, or {layer: multiple}) a layer chooses among ranks that are
    multiples of its own (kernel-friendly shapes) and the leftover is spent that many ranks
    at a time.
    """
    budget = (1 - ratio) * sum(dense_params(m, n) for m, n in shapes.values())
    step = _per_layer(shapes, multiple)
    options = {name: _LayerOptions(shapes[name], spectra[name], min_rank, step[name])
               for name in shapes}

    def choose(lam: float) -> dict[str, int | None]:
        return {name: opt.best(lam) for name, opt in options.items()}

    def spend(ranks) -> int:
        return sum(options[name].params(r) for name, r in ranks.items())

    lo, hi = -100.0, 100.0      # bisection on log10(lam); spend falls as lam grows
    if spend(choose(10.0 ** hi)) > budget:
        raise RankwiseError(f"ratio {ratio} cannot be reached with at least rank {min_rank} "
                            "in every layer")
    for _ in range(100):
        mid = (lo + hi) / 2
        if spend(choose(10.0 ** mid)) > budget:
            lo = mid
        else:
            hi = mid
    ranks = choose(10.0 ** hi)
    return _fill(ranks, options, budget - spend(ranks))


class _LayerOptions:
    """Loss and parameters of every choice for one layer (index r = rank; None = dense)."""

    def __init__(self, shape: tuple[int, int], spectrum: torch.Tensor, min_rank: int,
                 multiple: int = 1):
        m, n = shape
        self.m, self.n, self.step = m, n, multiple
        low = -(-max(min_rank, 1) // multiple) * multiple    # the first multiple >= min_rank
        self.top = max_useful_rank(m, n) // multiple * multiple
        self.min_rank = min(low, self.top) if self.top >= multiple else None
        s = spectrum.detach().to("cpu", torch.float64).clamp_min(0)   # cheap; no GPU syncs
        tail = s.flip(0).cumsum(0).flip(0)                     # tail[r] = sum_{i >= r} s_i
        self.loss = torch.cat([tail, torch.zeros(1, dtype=torch.float64)])   # loss[r]
        self.ranks = torch.arange(self.loss.numel(), dtype=torch.float64)

    def params(self, r: int | None) -> int:
        return params_at((self.m, self.n), r)

    def best(self, lam: float) -> int | None:
        if self.min_rank is None:
            return None
        lo, hi, step = self.min_rank, self.top, self.step
        cost = self.loss[lo:hi + 1:step] + lam * self.ranks[lo:hi + 1:step] * (self.m + self.n)
        i = int(cost.argmin())
        return None if lam * self.m * self.n <= float(cost[i]) else lo + i * step


def _fill(ranks: dict[str, int | None], options: dict[str, _LayerOptions],
          leftover: float) -> dict[str, int | None]:
    """Spend leftover parameters one rank step at a time on the best loss drop per
    parameter."""
    ranks = dict(ranks)
    while True:
        best, best_gain = None, 0.0
        for name, r in ranks.items():
            opt = options[name]
            if r is None or r + opt.step > opt.top:
                continue
            cost = opt.step * (opt.m + opt.n)
            gain = float(opt.loss[r] - opt.loss[r + opt.step]) / cost
            if cost <= leftover and gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return ranks
        ranks[best] += options[best].step
        leftover -= options[best].step * (options[best].m + options[best].n)


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
