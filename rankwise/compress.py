"""compress_(model, config, calib): statistics -> decompositions -> allocation -> swap."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocate, geometry, stats
from .config import CompressConfig
from .errors import RankwiseError
from .layers import LowRankLinear, dense_params
from .models import check_finite, set_module, target_linears

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


def compress_(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None = None,
              batch_size: int = 4, seed: int = 0, progress: bool = True,
              precomputed: dict[str, stats.LayerStats] | None = None) -> Summary:
    """Replace the targeted linear layers of `model` in place by low-rank factors.

    calib: LongTensor (num_windows, seqlen) of calibration token ids; needed by every metric
    but `svd`. precomputed: statistics from `stats.collect` on this model, reused instead
    of calib (e.g. to try several ratios). Returns a Summary with the per-layer ranks and
    the achieved ratio.
    """
    t0 = time.perf_counter()
    layers = target_linears(model, config.include, config.exclude)
    check_finite(model)
    shapes = {name: (l.out_features, l.in_features) for name, l in layers.items()}

    layer_stats: dict[str, stats.LayerStats] = precomputed or {}
    tokens = next(iter(layer_stats.values())).tokens if layer_stats else 0
    if config.metric != "svd" and not layer_stats:
        if calib is None or calib.numel() == 0:
            raise RankwiseError(f"metric {config.metric!r} needs calibration data")
        layer_stats = stats.collect(model, layers, calib.split(batch_size),
                                    inputs=config.needs_inputs, gradients=config.gradients,
                                    seed=seed, progress=progress)
        tokens = calib.numel()
    widest = max(max(shape) for shape in shapes.values())
    if config.metric in ("whiten", "kfac") and tokens < 2 * widest:
        log.warning("only %d calibration tokens for layers up to %d wide: the covariances are "
                    "rank-deficient and %s projections degrade badly; use more windows",
                    tokens, widest, config.metric)
    t_stats = time.perf_counter() - t0

    shared_roots = _SharedRoots()
    decompositions = {}
    for name in tqdm(list(layers), desc=f"decomposing ({config.metric})", unit="layer",
                     disable=not progress):
        s = layer_stats.get(name)
        metric_stats = geometry.metric_statistics(
            config.metric, shapes[name], **(s.matrices() if s else {}))
        decompositions[name] = geometry.decompose(layers[name].weight.detach(),
                                                  damping=config.damping, root=shared_roots,
                                                  **metric_stats)
    if config.allocation == "spectrum":
        ranks = allocate.spectrum_ranks(
            shapes, {k: d.spectrum for k, d in decompositions.items()}, config.ratio,
            config.min_rank)
    else:
        ranks = allocate.uniform_ranks(shapes, config.ratio)
    ranks = allocate.apply_rank_pattern(ranks, shapes, config.rank_pattern)

    for name, rank in ranks.items():
        if rank is not None:
            B, A = decompositions[name].factors(rank)
            linear = layers[name]
            set_module(model, name, LowRankLinear.from_linear(
                linear, A.to(linear.weight.dtype), B.to(linear.weight.dtype)))
    predicted = sum(d.dropped_loss(ranks[k]) for k, d in decompositions.items()
                    if ranks[k] is not None)
    t_total = time.perf_counter() - t0

    dense = sum(dense_params(m, n) for m, n in shapes.values())
    kept = allocate.kept_params(shapes, ranks)
    summary = Summary(metric=config.metric, requested_ratio=config.ratio,
                      achieved_ratio=allocate.achieved_ratio(shapes, ranks), ranks=ranks,
                      shapes=shapes, dense_params=dense, compressed_params=kept,
                      calibration_tokens=tokens, predicted_loss=predicted,
                      seconds={"statistics": t_stats, "projection": t_total - t_stats,
                               "total": t_total})
    log.info("compressed %d layers with %s: ratio %.4f achieved (%.4f requested) in %.1f s",
             len(layers), config.metric, summary.achieved_ratio, config.ratio, t_total)
    return summary


class _SharedRoots:
    """psd_root, memoised per statistics tensor: a covariance shared by several layers
    (q/k/v, gate/up) is decomposed once."""

    def __init__(self):
        self._cache: dict[int, tuple[torch.Tensor, geometry.Root]] = {}

    def __call__(self, S: torch.Tensor, damping: float) -> geometry.Root:
        hit = self._cache.get(id(S))
        if hit is None or hit[0] is not S:
            hit = self._cache[id(S)] = (S, geometry.psd_root(S, damping))
        return hit[1]
