"""compress_(model, config, calib): statistics -> allocation -> projection -> module swap."""
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
from .layers import LowRankLinear, dense_params, factored_params
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
    seconds: dict[str, float] = field(default_factory=dict)


def compress_(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None = None,
              batch_size: int = 4, seed: int = 0, progress: bool = True) -> Summary:
    """Replace the targeted linear layers of `model` in place by low-rank factors.

    calib: LongTensor (num_windows, seqlen) of calibration token ids; needed by every metric
    but `svd`. Returns a Summary with the per-layer ranks and the achieved ratio.
    """
    t0 = time.perf_counter()
    layers = target_linears(model, config.include, config.exclude)
    check_finite(model)
    shapes = {name: (l.out_features, l.in_features) for name, l in layers.items()}
    ranks = allocate.uniform_ranks(shapes, config.ratio)
    ranks = allocate.apply_rank_pattern(ranks, shapes, config.rank_pattern)

    layer_stats: dict[str, stats.LayerStats] = {}
    tokens = 0
    if config.metric != "svd":
        if calib is None or calib.numel() == 0:
            raise RankwiseError(f"metric {config.metric!r} needs calibration data")
        layer_stats = stats.collect(model, layers, calib.split(batch_size),
                                    inputs=config.needs_inputs, gradients=config.gradients,
                                    seed=seed, progress=progress)
        tokens = calib.numel()
    t_stats = time.perf_counter() - t0

    shared_roots = _SharedRoots()
    for name in tqdm(list(layers), desc=f"projecting ({config.metric})", unit="layer",
                     disable=not progress):
        rank = ranks[name]
        if rank is None:
            continue
        linear = layers[name]
        s = layer_stats.get(name)
        metric_stats = geometry.metric_statistics(
            config.metric, shapes[name], **(s.matrices() if s else {}))
        factors = geometry.project(linear.weight.detach(), rank, damping=config.damping,
                                   root=shared_roots, **metric_stats)
        set_module(model, name, LowRankLinear.from_linear(linear, factors.A, factors.B))
        layer_stats.pop(name, None)   # free statistics as soon as they are spent
    t_total = time.perf_counter() - t0

    dense = sum(dense_params(m, n) for m, n in shapes.values())
    kept = sum(dense_params(*shapes[k]) if r is None else factored_params(*shapes[k], r)
               for k, r in ranks.items())
    summary = Summary(metric=config.metric, requested_ratio=config.ratio,
                      achieved_ratio=allocate.achieved_ratio(shapes, ranks), ranks=ranks,
                      shapes=shapes, dense_params=dense, compressed_params=kept,
                      calibration_tokens=tokens,
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
