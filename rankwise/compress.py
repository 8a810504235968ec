"""compress_(model, config, calib): statistics -> decompositions -> allocation -> cut.

A stage is a composition of three parts, each chosen once:
  statistics  where each block's statistics come from: the block walk (rankwise.pipeline
              .walk: one block at a time, on the device the placement names, shared by
              torchrun processes), statistics given by the caller, or none (svd);
  cut         as each block's statistics arrive its layers are decomposed (on the device,
              batched) and the statistics dropped; with ranks known up front (uniform) the
              layers are cut at once, otherwise each layer's spectrum is kept and its
              factors at every rank it could be given are parked on disk
              (rankwise.pipeline.spill) until the allocation has seen every spectrum;
              sequential mode instead parks the gradient side of the statistics and cuts
              block by block on inputs re-measured through the blocks already cut;
  allocation  the registry record's own `choose` (rankwise.allocate), refined by the
              search when the record asks for it.
Memory therefore holds one block's statistics and decompositions at a time, whatever the
depth; no decomposition is computed twice for one cut.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from . import allocate, geometry, metrics
from .allocate import ALLOCATIONS
from .config import CompressConfig
from .errors import RankwiseError
from .evaluate import reference_log_probs
from .fusion import fuse_causal_lm
from .layers import (LowRankLinear, held_by, linear_shape, linear_weight, max_useful_rank,
                     ranks_of, set_module)
from .models import check_finite, names_by_block, target_linears
from .pipeline.distributed import Comm
from .pipeline.placement import Placement
from .pipeline.spill import Spill
from .pipeline.walk import walk
from .search import SearchResult, search_ranks
from .stats import GRADIENT_SIDE, INPUT_SIDE, LayerStats

log = logging.getLogger(__name__)


@dataclass
class Summary:
    metric: str
    requested_ratio: float
    achieved_ratio: float
    ranks: dict[str, int | None]          # None: layer kept dense
    shapes: dict[str, tuple[int, int]]
    dense_params: int                     # of the targeted layers
    compressed_params: int
    calibration_tokens: int = 0
    predicted_loss: float = 0.0           # summed dropped spectrum; kfac: ~2 x KL/token x tokens^2
    seconds: dict[str, float] = field(default_factory=dict)
    search: SearchResult | None = None
    spilled_bytes: int = 0                # written to the scratch folder


def compress_(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None = None,
              batch_size: int = 4, seed: int = 0, progress: bool = True,
              precomputed: dict[str, LayerStats] | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              onload: str | torch.device | None = None, scratch: str | None = None,
              placement: Placement | None = None) -> Summary:
    """Replace the targeted linear layers of `model` in place by low-rank factors.

    calib: LongTensor (num_windows, seqlen) of calibration token ids; needed by every metric
    but `svd`. precomputed: statistics from `stats.collect` on this model, used instead of
    calib (e.g. to try several ratios; one-step compression only). filter_fn(module,
    name): narrows the targets beyond config.include / exclude. With `config.steps = k` the
    ratio is reached in k stages, the statistics measured again on the partly compressed
    model before each. With `config.sequential` each block is cut on inputs re-measured
    through the blocks already cut. onload: a device (e.g. "cuda") that the blocks visit one
    at a time while the model stays where it is (placement: the same, spelled out;
    rankwise.pipeline.placement). scratch: the folder for the temporary spill (default:
    the system's). Factored layers that read the same input (q/k/v, gate/up) are then
    fused for inference (layers.Siblings). Returns a Summary with the per-layer ranks and
    the achieved ratio.
    """
    if precomputed is not None and (config.steps > 1 or config.sequential):
        raise RankwiseError("precomputed statistics describe the dense model; they cannot "
                            "be reused across the stages of a multi-step or sequential "
                            "compression")
    t0 = time.perf_counter()
    # names only: a reference to a layer would keep its dense weight alive after the cut
    shapes = {name: linear_shape(l) for name, l in
              target_linears(model, config.include, config.exclude, filter_fn).items()}
    check_finite(model)
    metric = metrics.get(config.metric)
    if metric.needs_calibration and precomputed is None and (calib is None or calib.numel() == 0):
        raise RankwiseError(f"metric {metric.name!r} needs calibration data")
    placement = placement or Placement.of(model, onload)
    allocation = ALLOCATIONS[config.allocation]
    fitness = None
    if allocation.searched:
        calib, fitness = _hold_out(model, calib, config.search_windows, progress)
    tokens = next(iter(precomputed.values())).tokens if precomputed else \
        calib.numel() if metric.needs_calibration else 0
    if metric.inputs and tokens and tokens < 2 * max(max(s) for s in shapes.values()):
        log.warning("only %d calibration tokens for layers up to %d wide: the covariances are "
                    "rank-deficient and %s projections degrade badly; use more windows",
                    tokens, max(max(s) for s in shapes.values()), metric.name)
    stage = _Stage(model, config, metric, placement, Comm.current(), batch_size, seed, progress)
    predicted, searched = 0.0, None
    with Spill(scratch) as spill:
        for step in range(1, config.steps + 1):
            stage.layers = {name: model.get_submodule(name) for name in shapes}
            predicted, searched = stage.run(config.ratio * step / config.steps, calib, spill,
                                            precomputed, fitness if step == config.steps else None)
        spilled = spill.written
    fuse_causal_lm(model)
    t_total = time.perf_counter() - t0

    ranks = ranks_of(model, shapes)
    summary = Summary(metric=config.metric, requested_ratio=config.ratio,
                      achieved_ratio=allocate.achieved_ratio(shapes, ranks), ranks=ranks,
                      shapes=shapes, dense_params=sum(m * n for m, n in shapes.values()),
                      compressed_params=allocate.kept_params(shapes, ranks),
                      calibration_tokens=tokens, predicted_loss=predicted,
                      seconds={"statistics": stage.seconds["statistics"],
                               "projection": t_total - stage.seconds["statistics"],
                               "total": t_total}, search=searched, spilled_bytes=spilled)
    log.info("compressed %d layers with %s: ratio %.4f achieved (%.4f requested) in %.1f s",
             len(shapes), config.metric, summary.achieved_ratio, config.ratio, t_total)
    return summary


def _hold_out(model, calib, windows: int, progress: bool):
    """Split the last `windows` calibration windows off as the search's fitness data, with
    the dense model's log-probabilities on them (before anything is cut)."""
    if calib is None or calib.shape[0] <= windows:
        raise RankwiseError(f"allocation 'search' holds out {windows} calibration windows for "
                            f"its fitness and needs more than that "
                            f"(got {0 if calib is None else calib.shape[0]})")
    held = calib[-windows:]
    return calib[:-windows], (held, reference_log_probs(model, held, batch_size=1,
                                                        progress=progress))


class _Stage:
    """One cut of the model to a ratio: statistics block by block, decompositions as they
    arrive, the allocation, the cut (see the module docstring)."""

    def __init__(self, model, config: CompressConfig, metric: metrics.Metric,
                 placement: Placement, comm: Comm | None, batch_size: int, seed: int,
                 progress: bool):
        self.model, self.config, self.metric, self.placement = model, config, metric, placement
        self.comm, self.batch_size, self.seed, self.progress = comm, batch_size, seed, progress
        self.allocation = ALLOCATIONS[config.allocation]
        self.layers: dict[str, nn.Module] = {}
        self.seconds = {"statistics": 0.0}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: linear_shape(l) for name, l in self.layers.items()}

    def _ranks(self, spectra: dict[str, torch.Tensor], ratio: float) -> dict[str, int | None]:
        """The allocation's ranks, in each layer's rank steps, with the explicit overrides."""
        c, shapes = self.config, self.shapes
        multiples = allocate.rank_multiples(shapes, c.rank_multiple)
        return allocate.apply_rank_pattern(
            self.allocation.choose(shapes, spectra, ratio, c.min_rank, multiples),
            shapes, c.rank_pattern)

    def run(self, ratio: float, calib, spill: Spill, precomputed, fitness
            ) -> tuple[float, SearchResult | None]:
        """Cut to `ratio`; returns (predicted loss of the cut, search result or None)."""
        c, layers = self.config, self.layers
        known = None
        if not self.allocation.needs_spectra:
            known = self._ranks({}, ratio)
        # what each block's decompositions leave: the cut itself (ranks known), factors at
        # every rank the allocation or the search may choose, or (sequential) the spectra
        park_factors = known is None and (not c.sequential or self.allocation.searched)
        park_gradients = c.sequential and self.metric.gradients is not None
        spectra, predicted = {}, 0.0
        measured = not (c.sequential and known is not None and not park_gradients)
        for names, block_stats in (self._statistics(calib, spill, precomputed) if measured else ()):
            for name in names if park_gradients else ():
                spill.put(f"gradients.{name}", {k: v for k, v in block_stats[name].matrices(
                    GRADIENT_SIDE).items() if v is not None})
            if c.sequential and known is not None:
                continue
            wanted = [n for n in names if known is None or _cuts(layers[n], known[n])]
            at = known if known is not None else \
                {n: _cap(layers[n]) for n in wanted} if park_factors else None
            for name, (spectrum, B, A) in self._decomposed(wanted, block_stats, at).items():
                spectra[name] = spectrum
                if known is not None:
                    predicted += self._swap(name, known[name], B, A, spectrum)
                elif B is not None:
                    spill.put(f"factors.{name}", {"B_t": B.T, "A": A})
            del block_stats
        ranks, searched = known, None
        if known is None:
            ranks = self._ranks(spectra, ratio)
        if fitness is not None:
            searched = self._search(ranks, spill, fitness)
            ranks = searched.ranks
        if c.sequential:
            predicted = self._sequential_cut(ranks, calib, spill)
        elif known is None:
            for name, rank in ranks.items():
                if _cuts(layers[name], rank):
                    predicted += self._swap(name, rank, *self._parked(spill, name, rank),
                                            spectra[name])
        return predicted, searched

    @staticmethod
    def _parked(spill: Spill, name: str, rank: int):
        """(B, A) of rank `rank` from a layer's parked factors (only those rows are read)."""
        return (spill.get(f"factors.{name}", "B_t", rank).T,
                spill.get(f"factors.{name}", "A", rank))

    def _statistics(self, calib, spill: Spill, precomputed
                    ) -> Iterator[tuple[list[str], dict[str, LayerStats]]]:
        """(names, statistics) block by block: walked, given, or none (svd)."""
        t0 = time.perf_counter()
        if precomputed is not None or not self.metric.needs_calibration:
            for names in filter(None, names_by_block(self.model, self.layers)):
                yield names, {n: precomputed[n] for n in names} if precomputed else {}
            return
        comm = self.comm
        source = walk(self.model, self.layers, list(calib.split(self.batch_size)),
                      self.placement, spill, inputs=self.metric.inputs,
                      gradients=self.metric.gradients, seed=self.seed,
                      shard=comm.shard if comm else (0, 1),
                      reduce=comm.all_reduce if comm else None, progress=self.progress)
        for item in source:
            self.seconds["statistics"] += time.perf_counter() - t0
            yield item
            t0 = time.perf_counter()
        self.seconds["statistics"] += time.perf_counter() - t0

    def _decomposed(self, names: list[str], block_stats: dict[str, LayerStats],
                    ranks: dict[str, int] | None) -> dict[str, tuple]:
        """{name: (spectrum on the CPU, B, A)} of a block's layers, with factors of rank
        ranks[name] (None: spectra only). Under torchrun the layers are spread over the
        processes and broadcast from their owners."""
        comm, out = self.comm, {}
        mine = names if comm is None else names[comm.rank::comm.size]
        problems = []
        for name in mine:
            layer = self.layers[name]
            W = self.placement.to_device(linear_weight(layer).detach())
            matrices = block_stats[name].matrices() if name in block_stats else {}
            problems.append((W, self.metric.statistics(linear_shape(layer), **matrices)))
        for name, d in zip(mine, geometry.decompose_many(problems, self.config.damping)):
            B = A = None
            if ranks is not None and ranks[name] >= 1:
                dtype = held_by(self.layers[name]).dtype
                B, A = (t.to(dtype) for t in d.factors(ranks[name]))
            out[name] = (d.spectrum.to("cpu"), B, A)
        return out if comm is None else self._shared(names, out, ranks)

    def _shared(self, names: list[str], mine: dict, ranks: dict[str, int] | None) -> dict:
        """Every process's decompositions of a block, broadcast from their owners."""
        out, device = {}, self.placement.device
        for j, name in enumerate(names):
            owner, (m, n) = j % self.comm.size, linear_shape(self.layers[name])
            spectrum, B, A = mine.get(name, (None, None, None))
            got = [self.comm.broadcast(spectrum, (min(m, n),), torch.float64, owner, "cpu")]
            if ranks is not None and ranks[name] >= 1:
                dtype, r = held_by(self.layers[name]).dtype, ranks[name]
                got += [self.comm.broadcast(B, (m, r), dtype, owner, device),
                        self.comm.broadcast(A, (r, n), dtype, owner, device)]
            out[name] = (*got, None, None)[:3]
        return out

    def _swap(self, name: str, rank: int, B, A, spectrum) -> float:
        """Put the rank-`rank` factors in place of the layer (whose dense weight is then
        freed); the predicted loss of the cut."""
        new = LowRankLinear.from_linear(self.layers[name], A[:rank], B[:, :rank])
        set_module(self.model, name, new)
        self.layers[name] = new
        return float(spectrum[rank:].sum())

    def _search(self, ranks, spill: Spill, fitness) -> SearchResult:
        c = self.config
        caps = {k: l.rank for k, l in self.layers.items() if isinstance(l, LowRankLinear)}
        return search_ranks(self.model, self.layers, lambda name, rank: self._parked(spill, name, rank),
                            self.shapes, ranks, *fitness, generations=c.search_generations,
                            seconds=c.search_seconds, offspring=c.search_offspring,
                            min_rank=c.min_rank, caps=caps,
                            multiples=allocate.rank_multiples(self.shapes, c.rank_multiple),
                            seed=self.seed, progress=self.progress)

    def _sequential_cut(self, ranks, calib, spill: Spill) -> float:
        """Block by block in order: each block's input side measured on what the blocks
        already cut produce, its gradient side as parked by the walk, then the cut. Every
        process measures every batch here, so each decomposes alone."""
        t0, predicted, comm = time.perf_counter(), 0.0, self.comm
        blocks = walk(self.model, self.layers, list(calib.split(self.batch_size)),
                      self.placement, spill, inputs=True, gradients=None, recut=True,
                      progress=self.progress)
        self.comm = None
        try:
            for names, fresh in blocks:
                wanted = [n for n in names if _cuts(self.layers[n], ranks[n])]
                block_stats = {}
                for name in wanted:
                    parked = spill.take(f"gradients.{name}") if self.metric.gradients else {}
                    block_stats[name] = LayerStats(
                        tokens=fresh[name].tokens, **fresh[name].matrices(INPUT_SIDE),
                        **{k: v.to(self.placement.device) for k, v in parked.items()})
                at = {n: ranks[n] for n in wanted}
                for name, (spectrum, B, A) in self._decomposed(wanted, block_stats, at).items():
                    predicted += self._swap(name, ranks[name], B, A, spectrum)
        finally:
            self.comm = comm
        log.info("sequential cut: inputs re-measured block by block in %.1f s",
                 time.perf_counter() - t0)
        return predicted


def _cap(layer: nn.Module) -> int:
    """The largest rank a layer can be given: one that still saves parameters, and never
    more than it has (a factored layer is only ever cut further)."""
    m, n = linear_shape(layer)
    top = max_useful_rank(m, n)
    return min(top, layer.rank) if isinstance(layer, LowRankLinear) else top


def _cuts(layer, rank: int | None) -> bool:
    """A layer is cut when given a rank, and only ever further."""
    return rank is not None and not (isinstance(layer, LowRankLinear) and rank >= layer.rank)
