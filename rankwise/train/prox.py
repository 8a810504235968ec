"""The rank constraint during training: the metric's roots, proximal steps (svt) and
truncations (hard) on every targeted weight's singular values in that metric.

A prox works on the singular values of L^{1/2} W R^{1/2} (svt.metric_svd), replaces
them by `svt.shrink` of them (the very step svt.singular_value_threshold takes)
and maps back, so it is the variable-metric proximal step and shrinks follow the
predicted KL rather than the Frobenius norm.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import geometry
from ..forms import allocate
from ..models.layers import params_at
from ..statistics import hooks as stats
from ..statistics import metrics
from . import svt


def metric_roots(model: nn.Module, layers: dict[str, nn.Module], task, metric: str,
                 damping: float, progress: bool = True) -> tuple[dict, dict]:
    """Per-layer (left, right) roots of the metric from the dense model's statistics, and
    the statistics themselves (for the one-shot `factors` projection)."""
    record = metrics.get(metric)
    if not record.needs_calibration:
        return {name: (None, None) for name in layers}, {}
    collected = stats.collect(model, layers, task.calibration_batches(), inputs=record.inputs,
                              gradients=record.gradients, progress=progress, both_sides=True,
                              forward=task.forward)
    shared = geometry.SharedRoots()
    return {name: record.roots(s, damping, shared) for name, s in collected.items()}, collected


def budget_threshold(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                     target: float, min_rank: int = 1) -> float:
    """The smallest tau whose soft-thresholding keeps at most `target` parameters (a layer
    keeps the singular values above tau, at least min_rank; it counts as dense while its
    rank saves nothing)."""
    def kept(tau: float) -> int:
        return sum(params_at(shapes[k], max(int((s > tau).sum()), min_rank))
                   for k, s in spectra.items())
    candidates = torch.cat([s for s in spectra.values()]).unique().sort().values
    lo, hi = 0, len(candidates) - 1
    if kept(0.0) <= target:
        return 0.0
    while lo < hi:                       # kept(candidate) falls as the candidate grows
        mid = (lo + hi) // 2
        if kept(float(candidates[mid])) <= target:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def penalty_weights(shapes: dict[str, tuple[int, int]], penalty: str) -> dict[str, float]:
    """Per-layer weights of the nuclear norms: 1, or sqrt(m + n) over its mean (weighted).
    A direction of singular value s costs about s^2 / 2 of metric loss and frees m + n
    parameters, so thresholding s / sqrt(m + n) drops the least loss per parameter first."""
    if penalty == "nuclear":
        return {k: 1.0 for k in shapes}
    mean = sum(m + n for m, n in shapes.values()) / len(shapes)
    return {k: math.sqrt((m + n) / mean) for k, (m, n) in shapes.items()}


def cubic_schedule(fraction: float) -> float:
    """Share of the total cut made by `fraction` of the proximal phase: fast early, when
    the model has most capacity to spare, slow near the budget (as in gradual pruning)."""
    return 1 - (1 - min(max(fraction, 0.0), 1.0)) ** 3


def truncated(spectra: dict[str, torch.Tensor], shapes, ratio: float, min_rank: int):
    """Hard truncation at the final budget: the global allocation over the squared
    singular values; returns (new singular values, kept ranks)."""
    ranks = allocate.spectrum_ranks(shapes, {k: s.square() for k, s in spectra.items()},
                                    ratio, min_rank)
    kept = {k: r or len(spectra[k]) for k, r in ranks.items()}
    new = {k: torch.where(torch.arange(len(s), device=s.device) < kept[k], s, torch.zeros_like(s))
           for k, s in spectra.items()}
    return new, kept


def thresholded(spectra: dict[str, torch.Tensor], weights: dict[str, float], tau: float,
                rule: str, min_rank: int):
    """Layer k's singular values shrunk at tau * weights[k] by `rule`; returns (new
    singular values, kept ranks)."""
    new = {k: svt.shrink(s / weights[k], tau, rule) * weights[k] for k, s in spectra.items()}
    kept = {k: max(int((s > 0).sum()), min_rank) for k, s in new.items()}
    return new, kept


def removed_loss(spectra: dict[str, torch.Tensor], new: dict[str, torch.Tensor]):
    """What a prox removed, 1/2 ||change||^2 in the metric (the predicted loss rise, in the
    statistics' units), and the part of it spent shrinking the directions it kept."""
    change = {k: (spectra[k] - s).double().square() for k, s in new.items()}
    total = 0.5 * sum(float(d.sum()) for d in change.values())
    shrinking = 0.5 * sum(float(d[new[k] > 0].sum()) for k, d in change.items())
    return total, shrinking
