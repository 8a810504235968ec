"""compress_(model, config, calib): statistics -> decompositions and prices -> allocation ->
cut, made by one plan chosen once (rankwise.cut.plans, keyed by the config's cut).

What a compression holds is one block's statistics and decompositions at a time (two
where a block's decompositions run beside the walk's next block: pipeline.overlap, on an
accelerator), whatever the depth. A layer is decomposed once per walk that measures it.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import geometry
from ..errors import RankwiseError
from ..evaluation.scoring import reference_log_probs
from ..forms import allocate
from ..forms.registry import Form, form_of
from ..models.blocks import check_finite, target_linears
from ..models.fusion import fuse_causal_lm
from ..models.layers import linear_shape, ranks_of
from ..pipeline.distributed import Comm
from ..pipeline.overlap import Beside, Inline
from ..pipeline.overlap import for_device as overlap_for
from ..pipeline.placement import Placement
from ..pipeline.spill import Spill
from ..pipeline.walk import Route
from ..statistics.hooks import LayerStats
from .choosing import Measurement
from .config import CompressConfig
from .plans import Originals, Outcome, plan_for
from .search import SearchResult
from .surgery import Made, Recipe, Target, Work

log = logging.getLogger(__name__)


@dataclass
class Summary:
    metric: str
    requested_ratio: float | None
    achieved_ratio: float
    ranks: dict[str, int | None]          # None: layer not factored
    shapes: dict[str, tuple[int, int]]
    dense_params: int                     # of the targeted layers
    compressed_params: int
    forms: dict[str, Form] = field(default_factory=dict)
    stored_bits: dict[str, int] = field(default_factory=dict)   # each layer's, bias included
    bits: float = 16.0                    # stored bits per original targeted parameter
    calibration_tokens: int = 0
    predicted_loss: float = 0.0           # summed dropped spectrum; kfac: ~2 x KL/token x tokens^2
    seconds: dict[str, float] = field(default_factory=dict)
    search: SearchResult | None = None
    spilled_bytes: int = 0                # written to the scratch folder
    cut: str = ""
    refinement: dict[int, tuple[float, float]] = field(default_factory=dict)
    # block -> its refinement loss (metric-weighted output error) before and after
    decompositions: dict[str, float] = field(default_factory=dict)
    # symmetric eigendecompositions: count, eigenvalues only, float64 redos, seconds
    # (geometry.EighCount)
    made: Made = field(default_factory=Made)   # per layer: predicted loss, raised damping, rounding

    def recorded(self, config: CompressConfig) -> dict:
        """What the manifest (rankwise.formats.manifest) records of this compression."""
        return dict(
            achieved_ratio=self.achieved_ratio, bits=self.bits, forms=self.layer_records(),
            targeted_params={"dense": self.dense_params, "compressed": self.compressed_params},
            rounding=self.made.tally.record(config.rounding) if config.rounds else None,
            seconds=self.seconds, decompositions=self.decompositions,
            refinement={str(k): {"before": before, "after": after}
                        for k, (before, after) in self.refinement.items()} or None,
            search=None if self.search is None else {
                "seed_kl": self.search.seed_fitness, "kl": self.search.fitness,
                "generations": self.search.generations, "evaluations": self.search.evaluations})

    def layer_records(self) -> dict[str, dict]:
        """The manifest's `forms`: per layer its form, stored bits and predicted loss."""
        out = {}
        for name, form in self.forms.items():
            record = {**form.record(), "stored_bits": self.stored_bits[name]}
            for key, values in (("predicted_loss", self.made.predicted),
                                ("priced_loss", self.made.priced),
                                ("raised_damping", self.made.raised_damping)):
                if name in values:
                    record[key] = values[name]
            out[name] = record
        return out


@dataclass
class Execution:
    """How compress_ runs rather than what it computes: calibration windows per forward
    pass, the seed of the sampled labels and of the refinement's batches, where the work
    runs (default: where the model is; Placement.of(model, "cuda") onloads one block at a
    time), the folder of the temporary spill (default: the system's) and how many bytes
    of what would be spilled may stay in memory where they are instead (default none), and
    whether a block's decompositions run beside the walk (pipeline.overlap; default: on an
    accelerator, not on a CPU)."""
    batch_size: int = 4
    seed: int = 0
    placement: Placement | None = None
    scratch: str | None = None
    keep_bytes: int = 0
    overlap: Callable[[torch.device], Inline | Beside] = overlap_for


def compress_(model: nn.Module, config: CompressConfig, calib: torch.Tensor | None = None, *,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              precomputed: dict[str, LayerStats] | None = None, progress: bool = True,
              execution: Execution | None = None,
              scale_dtype: torch.dtype = torch.bfloat16,
              measurement: Measurement | None = None) -> Summary:
    """Make the targeted linear layers of `model` into the forms the budget buys, in place:
    low-rank factors (--ratio), or any of rankwise.forms.registry (--bits), rounded weights and
    factors kept on their grids with scales in `scale_dtype` (the dtype the caller stores).

    calib: LongTensor (num_windows, seqlen) of calibration token ids; needed by every metric
    but `svd`, and by any rounding. filter_fn(module, name): narrows the targets beyond
    config.include / exclude. precomputed: statistics from `stats.collect` on this model,
    used instead of calib (e.g. to try several ratios; one one-shot cut only, no rounding).
    With `config.steps = k` the ratio is reached in k cuts, the statistics measured again on
    the partly compressed model before each (an anchored cut still anchors to the model as
    it was given). Factored layers that read the same input (q/k/v, gate/up) are then fused
    for inference (layers.Siblings). measurement (plans.Measurement, --bits only): an empty
    one is filled with this compression's first walk, a filled one replaces it (several
    budgets from one measurement). Returns a Summary with the per-layer forms.
    """
    execution = execution or Execution()
    if precomputed is not None and (config.steps > 1 or config.cut != "oneshot" or config.rounds):
        raise RankwiseError("precomputed statistics describe the dense model; they serve one "
                            "one-shot cut only, without rounding (--steps 1 --cut oneshot)")
    check_compressible(model)
    t0 = time.perf_counter()
    # names only: a reference to a layer would keep its dense weight alive after the cut
    shapes = {name: linear_shape(l) for name, l in
              target_linears(model, config.include, config.exclude, filter_fn).items()}
    check_finite(model)
    recipe = Recipe(config, scale_dtype)
    metric = recipe.metric
    calibrated = metric.needs_calibration or config.rounds
    if calibrated and precomputed is None and (calib is None or calib.numel() == 0):
        raise RankwiseError(f"metric {metric.name!r} needs calibration data" if
                            metric.needs_calibration else
                            "rounding weights in their metric needs calibration data")
    fitness = None
    if allocate.ALLOCATIONS[config.allocation].searched:
        calib, fitness = _hold_out(model, calib, config.search_windows, progress)
    tokens = next(iter(precomputed.values())).tokens if precomputed else \
        calib.numel() if calibrated else 0
    if metric.inputs and tokens and tokens < 2 * max(max(s) for s in shapes.values()):
        log.warning("only %d calibration tokens for layers up to %d wide: the covariances are "
                    "rank-deficient and %s projections degrade badly; use more windows",
                    tokens, max(max(s) for s in shapes.values()), metric.name)
    placement = execution.placement or Placement.of(model)
    seconds = {"statistics": 0.0, "anchored": 0.0, "refinement": 0.0}
    eighs_before, made = geometry.EIGH_COUNT.snapshot(), Made()
    outcome = Outcome()
    overlap = execution.overlap(placement.device)
    own_spill = measurement is None
    with Spill(execution.scratch, execution.keep_bytes) if own_spill else \
            contextlib.nullcontext(measurement.spill) as spill:
        route = Route(placement, spill, Comm.current(), progress)
        originals = Originals(model, list(shapes), spill) \
            if config.cut == "anchored" and config.steps > 1 else None
        try:
            for step in range(1, config.steps + 1):
                target = Target(model, list(shapes), recipe, made)
                work = Work(route, overlap, execution.seed, execution.batch_size, seconds,
                            config.damping)
                ratio = config.budget.ratio_at(step, config.steps)
                plan = plan_for(recipe, target, work, ratio,
                                fitness if step == config.steps else None, calib, originals,
                                measurement)
                if plan.wants is not None:
                    for block in work.statistics(target, plan.wants, calib, precomputed,
                                                 metric.needs_calibration):
                        plan.block(block)
                outcome = plan.finish()
        finally:
            overlap.close()
        spilled = spill.written if own_spill else 0
    fuse_causal_lm(model)
    t_total = time.perf_counter() - t0

    ranks = ranks_of(model, shapes)
    forms = {name: made.forms.get(name) or form_of(model.get_submodule(name))
             for name in shapes}
    stored = {name: form.stored_bits(shapes[name], recipe.storage,
                                     model.get_submodule(name).bias is not None)
              for name, form in forms.items()}
    dense_params = sum(m * n for m, n in shapes.values())
    summary = Summary(
        metric=config.metric, requested_ratio=config.ratio,
        achieved_ratio=allocate.achieved_ratio(shapes, ranks), ranks=ranks, shapes=shapes,
        dense_params=dense_params, compressed_params=allocate.kept_params(shapes, ranks),
        forms=forms, stored_bits=stored, bits=sum(stored.values()) / dense_params,
        calibration_tokens=tokens, predicted_loss=sum(made.predicted.values()),
        seconds={**seconds, "projection": t_total - seconds["statistics"] - seconds["anchored"],
                 "total": t_total},                       # refinement: part of "anchored"
        search=outcome.searched, spilled_bytes=spilled, cut=config.cut,
        refinement=outcome.refinement,
        decompositions=vars(geometry.EIGH_COUNT.since(eighs_before)), made=made)
    for name, damping in made.raised_damping.items():
        log.info("%s: a root's damping was raised to %.3g of its mean eigenvalue (round-off "
                 "left the statistic indefinite below the damping asked for)", name, damping)
    log.info("compressed %d layers with %s (%s cut): ratio %.4f, %.3f bits per parameter, "
             "in %.1f s", len(shapes), config.metric, config.cut, summary.achieved_ratio,
             summary.bits, t_total)
    return summary


def check_compressible(model: nn.Module) -> None:
    """One sentence for a model rankwise cannot compress further: one holding weights on
    an integer grid (cutting or rounding them again would round what was rounded, and the
    form written would not be the form made)."""
    rounded = [name for name, m in model.named_modules()
               if getattr(m, "rankwise_grid", None) is not None]
    if rounded:
        raise RankwiseError(f"the model holds rounded weights ({rounded[0]} and "
                            f"{len(rounded) - 1} more); compress or quantize the float model "
                            "they were rounded from")


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
