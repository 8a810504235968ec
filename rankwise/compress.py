"""compress_(model, config, calib): statistics -> decompositions -> allocation -> swap."""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocate, geometry, metrics, stats
from .allocate import ALLOCATIONS
from .config import CompressConfig
from .errors import RankwiseError
from .evaluate import reference_log_probs
from .layers import LowRankLinear, linear_shape, linear_weight, ranks_of, set_module
from .models import check_finite, target_linears
from .pipeline import distributed, sequential
from .pipeline import onload as onloading
from .search import SearchResult, search_ranks

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


def compress_(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None = None,
              batch_size: int = 4, seed: int = 0, progress: bool = True,
              precomputed: dict[str, stats.LayerStats] | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              onload: str | torch.device | None = None) -> Summary:
    """Replace the targeted linear layers of `model` in place by low-rank factors.

    calib: LongTensor (num_windows, seqlen) of calibration token ids; needed by every metric
    but `svd`. precomputed: statistics from `stats.collect` on this model, reused instead
    of calib (e.g. to try several ratios; one-step compression only). filter_fn(module,
    name): narrows the targets beyond config.include / exclude. With `config.steps = k` the
    ratio is reached in k stages, the statistics re-collected on the partly compressed
    model before each, so every layer is projected with the inputs and output gradients it
    will really see. With `config.sequential` each cut goes block by block, every block's
    input statistics re-measured on the outputs of the blocks already cut
    (rankwise.pipeline.sequential). onload: a device (e.g. "cuda") that the blocks visit one
    at a time while the model stays on the CPU (rankwise.pipeline.onload): statistics and
    decompositions run there with memory bounded by one block. Returns a Summary with the
    per-layer ranks and the achieved ratio.
    """
    if precomputed is not None and (config.steps > 1 or config.sequential):
        raise ValueError("precomputed statistics describe the dense model; they cannot be "
                         "reused across the stages of a multi-step or sequential compression")
    if onload is not None and distributed.world()[1] > 1:
        raise RankwiseError("onloading and several processes do not combine yet; use one")
    t0 = time.perf_counter()
    layers = target_linears(model, config.include, config.exclude, filter_fn)
    check_finite(model)
    shapes = {name: linear_shape(l) for name, l in layers.items()}
    fitness = None
    if ALLOCATIONS[config.allocation].searched:
        calib, fitness = _hold_out(model, calib, config.search_windows, progress)
    tokens, t_stats, predicted, searched = 0, 0.0, 0.0, None
    for stage in range(1, config.steps + 1):
        stage_ratio = config.ratio * stage / config.steps
        tokens, seconds, predicted, searched = _stage(
            model, layers, shapes, config, stage_ratio, calib, batch_size, seed, progress,
            precomputed, fitness if stage == config.steps else None, onload)
        t_stats += seconds
        layers = {name: model.get_submodule(name) for name in layers}
    t_total = time.perf_counter() - t0

    ranks = ranks_of(model, layers)
    summary = Summary(metric=config.metric, requested_ratio=config.ratio,
                      achieved_ratio=allocate.achieved_ratio(shapes, ranks), ranks=ranks,
                      shapes=shapes, dense_params=sum(m * n for m, n in shapes.values()),
                      compressed_params=allocate.kept_params(shapes, ranks),
                      calibration_tokens=tokens, predicted_loss=predicted,
                      seconds={"statistics": t_stats, "projection": t_total - t_stats,
                               "total": t_total}, search=searched)
    log.info("compressed %d layers with %s: ratio %.4f achieved (%.4f requested) in %.1f s",
             len(layers), config.metric, summary.achieved_ratio, config.ratio, t_total)
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


def _measure(model, layers, shapes, metric, calib, batch_size, seed, progress, precomputed,
             onload_device=None):
    """(statistics, tokens) of the model as it is now, or the precomputed ones."""
    if precomputed or not metric.needs_calibration:
        tokens = next(iter(precomputed.values())).tokens if precomputed else 0
        return precomputed or {}, tokens
    if calib is None or calib.numel() == 0:
        raise RankwiseError(f"metric {metric.name!r} needs calibration data")
    if onload_device is not None:
        layer_stats = onloading.collect(model, layers, list(calib.split(batch_size)), onload_device,
                                     inputs=metric.inputs, gradients=metric.gradients, seed=seed,
                                     progress=progress)
    else:
        layer_stats = stats.collect(model, layers, calib.split(batch_size), inputs=metric.inputs,
                                    gradients=metric.gradients, seed=seed, progress=progress,
                                    sharded=True)
    _release_memory()
    widest = max(max(shape) for shape in shapes.values())
    if metric.inputs and calib.numel() < 2 * widest:
        log.warning("only %d calibration tokens for layers up to %d wide: the covariances are "
                    "rank-deficient and %s projections degrade badly; use more windows",
                    calib.numel(), widest, metric.name)
    return layer_stats, calib.numel()


def _stage(model, layers, shapes, config, ratio, calib, batch_size, seed, progress,
           precomputed, fitness=None, onload_device=None
           ) -> tuple[int, float, float, SearchResult | None]:
    """One cut to `ratio` (of the dense targeted parameters): statistics on the model as it
    is now, decompositions, allocation (searched when `fitness` data is given), module
    swap. Returns (tokens, statistics seconds, predicted loss, search result). A layer
    already factorized is only ever cut further."""
    metric, allocation = metrics.get(config.metric), ALLOCATIONS[config.allocation]
    t0 = time.perf_counter()
    layer_stats, tokens = _measure(model, layers, shapes, metric, calib, batch_size, seed,
                                   progress, precomputed, onload_device)
    t_stats = time.perf_counter() - t0

    shared_roots = geometry.SharedRoots(keep=4)     # shared inputs: q/k/v, gate/up
    on_device = _OnDevice(onload_device)
    bar = tqdm(desc=f"decomposing ({metric.name})", unit="layer",
               disable=not progress or not distributed.is_leader())

    def decompose(name):
        bar.update()
        matrices = layer_stats[name].matrices() if name in layer_stats else {}
        return on_device(layers[name], metric, config.damping, matrices, shared_roots)
    # memory holds one decomposition at a time: the allocation keeps only the spectra and
    # each layer is decomposed again when it is cut; the search (which slices every layer's
    # factors) and several processes (which broadcast them) keep them all
    decompositions, spectra = {}, {}
    if allocation.searched or distributed.world()[1] > 1:
        wanted = list(layers) if allocation.uses_spectra or not config.sequential else []
        decompositions = distributed.shared_decompositions(wanted, shapes, decompose)
        spectra = {k: d.spectrum for k, d in decompositions.items()}
    elif allocation.uses_spectra:
        spectra = {name: decompose(name).spectrum for name in layers}
    ranks = allocate.choose_ranks(config.allocation, shapes, spectra, ratio, config.min_rank,
                                  config.rank_multiple)
    ranks = allocate.apply_rank_pattern(ranks, shapes, config.rank_pattern)
    searched = None
    if fitness is not None:
        caps = {k: l.rank for k, l in layers.items() if isinstance(l, LowRankLinear)}
        searched = search_ranks(model, layers, decompositions, shapes, ranks, *fitness,
                                generations=config.search_generations,
                                seconds=config.search_seconds,
                                offspring=config.search_offspring, min_rank=config.min_rank,
                                caps=caps, seed=seed, progress=progress)
        ranks = searched.ranks

    predicted = 0.0
    if config.sequential:
        t1 = time.perf_counter()
        for names, fresh in sequential.measured_blocks(model, layers, calib.split(batch_size)):
            block_roots = geometry.SharedRoots()
            for name in (n for n in names if _cuts(layers[n], ranks[n])):
                matrices = {**layer_stats[name].matrices(),
                            **{k: getattr(fresh[name], k) for k in sequential.INPUT_SIDE}}
                predicted += _swap(model, name, layers[name], ranks[name],
                                   on_device(layers[name], metric, config.damping, matrices,
                                             block_roots))
        log.info("sequential cut: inputs re-measured block by block in %.1f s",
                 time.perf_counter() - t1)
    else:
        predicted = sum(_swap(model, name, layers[name], rank,
                              decompositions.get(name) or decompose(name))
                        for name, rank in ranks.items() if _cuts(layers[name], rank))
    bar.close()
    return tokens, t_stats, predicted, searched


def _release_memory() -> None:
    """Hand the pass's freed activations back to the system: glibc keeps large freed blocks
    in its arenas, which otherwise stay in the process's resident memory for good."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to trim
        pass


class _OnDevice:
    """Decompositions where the weights are, or on the onloading device: there the weight
    and each statistic are moved once (layers sharing an input still share one root) and
    the result waits on the CPU."""

    def __init__(self, device=None):
        self.device = None if device is None or torch.device(device).type == "cpu" else device
        self.moved: dict[int, torch.Tensor] = {}

    def __call__(self, layer, metric: metrics.Metric, damping: float, matrices: dict,
                 roots) -> geometry.Decomposition:
        weight = linear_weight(layer).detach()
        if self.device is None:
            return geometry.decompose(weight, damping=damping, root=roots,
                                      **metric.statistics(linear_shape(layer), **matrices))
        matrices = {k: None if t is None else self.moved.setdefault(id(t), t.to(self.device))
                    for k, t in matrices.items()}
        d = geometry.decompose(weight.to(self.device), damping=damping, root=roots,
                               **metric.statistics(linear_shape(layer), **matrices))
        return dataclasses.replace(d.to("cpu"), W=weight)


def _cuts(layer, rank: int | None) -> bool:
    """A layer is cut when given a rank, and only ever further."""
    return rank is not None and not (isinstance(layer, LowRankLinear) and rank >= layer.rank)


def _swap(model, name, layer, rank, decomposition) -> float:
    """Put the rank-`rank` factors in place of `layer`; the predicted loss of the cut."""
    B, A = decomposition.factors(rank)
    dtype = layer.A.dtype if isinstance(layer, LowRankLinear) else layer.weight.dtype
    set_module(model, name, LowRankLinear.from_linear(layer, A.to(dtype), B.to(dtype)))
    return decomposition.dropped_loss(rank)
