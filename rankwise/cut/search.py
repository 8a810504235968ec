"""Evolutionary search over per-layer ranks under one parameter budget (EvoPress-style).

The search starts from the spectrum allocation and keeps one parent. Each generation
mutates it into `offspring` candidates; a mutation moves parameters from one layer (the
donor loses ranks) to another (the receiver gains what that frees), so no candidate
exceeds the budget. Fitness is the KL divergence of next-token distributions from the
dense model on held-out windows. Selection is multi-step: every offspring is scored on
the first window (cheap), the best `survivors` on all windows, and the parent is replaced
only by a strictly fitter one, so the result is never worse than the seed. Each layer's
factors are decomposed once; a candidate of any rank is a slice of them, so a candidate
costs forward passes, not decompositions.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation.scoring import evaluate
from ..models.layers import LowRankLinear, max_useful_rank, params_at, set_module

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    ranks: dict[str, int | None]
    fitness: float                     # KL(dense || model) per token on all fitness windows
    seed_fitness: float
    generations: int
    evaluations: int
    seconds: float
    trace: list[float] = field(default_factory=list)   # parent fitness after each generation


class _Candidates:
    """Puts a rank assignment into the model (factors read by `factors(name, rank)`) and
    measures its KL to the dense model; restores the original layers afterwards."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], factors,
                 windows: torch.Tensor, reference: list[torch.Tensor], batch_size: int):
        self.model, self.windows, self.reference = model, windows, reference
        self.batch_size = batch_size
        self.original = dict(layers)
        self.factors = factors

    def apply(self, ranks: dict[str, int | None]) -> None:
        for name, rank in ranks.items():
            current = self.model.get_submodule(name)
            if rank is None:
                if current is not self.original[name]:
                    set_module(self.model, name, self.original[name])
                continue
            if isinstance(current, LowRankLinear) and current is not self.original[name] \
                    and current.rank == rank:
                continue
            B, A = self.factors(name, rank)
            set_module(self.model, name, LowRankLinear.from_linear(self.original[name], A, B))

    def restore(self) -> None:
        for name, layer in self.original.items():
            set_module(self.model, name, layer)

    def kl(self, ranks: dict[str, int | None], windows: int | None = None) -> float:
        """Mean KL(dense || candidate) per predicted token on the first `windows` batches."""
        self.apply(ranks)
        batches = len(self.reference) if windows is None else windows
        return evaluate(self.model, self.windows[:batches * self.batch_size],
                        self.reference[:batches], self.batch_size, progress=False).kl


class Budget:
    """Parameter accounting of rank assignments (None = dense) and the mutation that moves
    parameters between layers without exceeding the parent's spend."""

    def __init__(self, shapes: dict[str, tuple[int, int]], caps: dict[str, int | None],
                 min_rank: int, multiples: dict[str, int] | None = None):
        self.shapes = shapes
        self.step = {k: (multiples or {}).get(k, 1) for k in shapes}   # ranks in these steps
        self.low = {k: -(-min_rank // s) * s for k, s in self.step.items()}
        self.top = {k: (max_useful_rank(m, n) if caps.get(k) is None else caps[k])
                    // self.step[k] * self.step[k] for k, (m, n) in shapes.items()}
        self.can_be_dense = {k: caps.get(k) is None for k in shapes}

    def params(self, name: str, rank: int | None) -> int:
        return params_at(self.shapes[name], rank)

    def total(self, ranks: dict[str, int | None]) -> int:
        return sum(self.params(k, r) for k, r in ranks.items())

    def mutate(self, ranks: dict[str, int | None], rng: random.Random, quantum: int,
               moves: int) -> dict[str, int | None]:
        """Move about `quantum` parameters from a donor layer to a receiver, `moves` times,
        then spend any slack on random layers; never exceeds the parent's spend."""
        child = dict(ranks)
        names = list(child)
        slack = 0
        for _ in range(moves):
            donor, receiver = rng.sample(names, 2)
            before = self.params(donor, child[donor])
            r = self.top[donor] if child[donor] is None else child[donor]
            m, n = self.shapes[donor]
            step = self.step[donor]
            cut = -(-max(1, round(quantum / (m + n))) // step) * step
            child[donor] = max(min(self.low[donor], r), r - cut)
            slack += before - self.params(donor, child[donor])
            slack = self._grow(child, receiver, slack)
        while True:      # spend what rounding left on layers it still fits
            fits = [k for k in names if child[k] is not None and child[k] < self.top[k]
                    and sum(self.shapes[k]) * self.step[k] <= slack]
            if not fits:
                return child
            slack = self._grow(child, rng.choice(fits), slack)

    def _grow(self, child, name: str, slack: int) -> int:
        if child[name] is None:
            return slack
        m, n = self.shapes[name]
        step = self.step[name]
        gain = min(slack // (m + n), self.top[name] - child[name]) // step * step
        child[name] += gain
        slack -= gain * (m + n)
        if child[name] == self.top[name] and self.can_be_dense[name]:
            extra = self.params(name, None) - self.params(name, child[name])
            if extra <= slack:
                child[name], slack = None, slack - extra
        return slack


@dataclass(frozen=True)
class Fitness:
    """What a candidate is scored on: held-out windows and the dense model's
    log-probabilities on them (one tensor per batch of `batch_size` windows)."""
    windows: torch.Tensor
    reference: list[torch.Tensor]
    batch_size: int = 1


@dataclass(frozen=True)
class SearchSettings:
    """How long and how wide the search goes: at most `generations` (or `seconds`),
    `offspring` candidates a generation, the best `survivors` of them scored on every
    window; `seed` of the mutations."""
    generations: int = 50
    offspring: int = 8
    survivors: int = 2
    seconds: float | None = None
    seed: int = 0
    progress: bool = True


def search_ranks(model: nn.Module, layers: dict[str, nn.Module], factors,
                 seed_ranks: dict[str, int | None], fitness: Fitness, budget: "Budget",
                 settings: SearchSettings = SearchSettings()) -> SearchResult:
    """Search per-layer ranks around `seed_ranks` (the budget's parameters) minimising the
    KL to the dense model on `fitness`; factors(name, rank) -> (B, A) of a layer at a rank.
    The model is left as it was."""
    t0 = time.perf_counter()
    rng = random.Random(settings.seed)
    candidates = _Candidates(model, layers, factors, fitness.windows, fitness.reference,
                             fitness.batch_size)
    shapes = budget.shapes
    quantum = 8 * sorted(m + n for m, n in shapes.values())[len(shapes) // 2]
    try:
        parent = dict(seed_ranks)
        parent_fitness = seed_fitness = candidates.kl(parent)
        evaluations, trace, generation = 1, [], 0
        bar = tqdm(range(settings.generations), desc="rank search", unit="gen",
                   disable=not settings.progress)
        for generation in bar:
            if settings.seconds is not None and time.perf_counter() - t0 > settings.seconds:
                break
            children = [budget.mutate(parent, rng, quantum, rng.randint(1, 3))
                        for _ in range(settings.offspring)]
            cheap = sorted((candidates.kl(c, windows=1), i) for i, c in enumerate(children))
            evaluations += len(children)
            for _, i in cheap[:settings.survivors]:
                score = candidates.kl(children[i])     # not `fitness`: that is the argument
                evaluations += 1
                if score < parent_fitness:
                    parent, parent_fitness = children[i], score
            trace.append(parent_fitness)
            bar.set_postfix(kl=f"{parent_fitness:.4f}")
        else:
            generation = settings.generations
    finally:
        candidates.restore()
    result = SearchResult(ranks=parent, fitness=parent_fitness, seed_fitness=seed_fitness,
                          generations=generation, evaluations=evaluations,
                          seconds=time.perf_counter() - t0, trace=trace)
    log.info("rank search: KL %.4f -> %.4f in %d generations (%d evaluations, %.0f s)",
             seed_fitness, parent_fitness, result.generations, evaluations, result.seconds)
    return result
