"""compress_(model, config, calib): statistics -> decompositions -> allocation -> cut.

A compression is `config.steps` cuts, each made by one plan chosen once:
  Immediate   ranks known up front (uniform, explicit): each block's layers are decomposed
              and cut as its statistics arrive from the walk;
  Parked      ranks from every layer's spectrum (spectrum, search): each layer's spectrum
              is kept and its factors at every rank the allocation could give it parked on
              disk (rankwise.pipeline.spill) until the allocation, and the search, have
              seen them all; the cut reads back only the kept rows;
  Anchored    ranks as one of the two above would choose them, from a first statistics walk
              that also parks each layer's gradient side and each block's output Fisher;
              then block by block on the compressed stream (rankwise.pipeline.streams):
              each layer fitted to reproduce the dense model's output from the inputs the
              already-compressed model gives it (geometry.anchored), then each block's
              factors refined toward the dense block's output (rankwise.train.refine).
Every plan answers the same three questions: what the statistics walk must collect
(`wants`), what to do with a block's statistics as they arrive (`block`), and what to do
at the end (`finish`). The walks only move data; one process is a Comm that does nothing.
What a compression holds is one block's statistics and decompositions at a time (two
where a block's decompositions run beside the walk's next block: pipeline.overlap, on an
accelerator), whatever the depth. A layer is decomposed once per walk that measures it:
Immediate and Parked once, Anchored twice (the eigenvalues alone of the dense model's
problem for the allocation, then the anchored problem on the compressed stream).
"""
from __future__ import annotations

import copy
import dataclasses
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
from .pipeline.overlap import Beside, Inline
from .pipeline.overlap import for_device as overlap_for
from .pipeline.placement import Placement
from .pipeline.spill import Spill
from .pipeline.streams import BlockStream, GroupInputs, walk_streams
from .pipeline.walk import BlockStatistics, Route, Wants, walk
from .search import SearchResult, search_ranks
from .stats import GRADIENT_SIDE, LayerStats
from .train.refine import refine_block

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
    plan: str = ""                        # how the last cut went: immediate, parked, anchored
    refinement: dict[int, tuple[float, float]] = field(default_factory=dict)
    # block -> its refinement loss (metric-weighted output error) before and after
    decompositions: dict[str, float] = field(default_factory=dict)
    # symmetric eigendecompositions: count, eigenvalues only, float64 redos, seconds
    # (geometry.EighCount)


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
              execution: Execution | None = None) -> Summary:
    """Replace the targeted linear layers of `model` in place by low-rank factors.

    calib: LongTensor (num_windows, seqlen) of calibration token ids; needed by every metric
    but `svd`. filter_fn(module, name): narrows the targets beyond config.include /
    exclude. precomputed: statistics from `stats.collect` on this model, used instead of
    calib (e.g. to try several ratios; one one-shot cut only). With `config.steps = k` the
    ratio is reached in k cuts, the statistics measured again on the partly compressed
    model before each (an anchored cut still anchors to the model as it was given).
    Factored layers that read the same input (q/k/v, gate/up) are then fused for inference
    (layers.Siblings). Returns a Summary with the per-layer ranks and the achieved ratio.
    """
    execution = execution or Execution()
    if precomputed is not None and (config.steps > 1 or config.cut != "oneshot"):
        raise RankwiseError("precomputed statistics describe the dense model; they serve one "
                            "one-shot cut only (--steps 1 --cut oneshot)")
    t0 = time.perf_counter()
    # names only: a reference to a layer would keep its dense weight alive after the cut
    shapes = {name: linear_shape(l) for name, l in
              target_linears(model, config.include, config.exclude, filter_fn).items()}
    check_finite(model)
    metric = metrics.get(config.metric)
    if metric.needs_calibration and precomputed is None and (calib is None or calib.numel() == 0):
        raise RankwiseError(f"metric {metric.name!r} needs calibration data")
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
    placement = execution.placement or Placement.of(model)
    seconds = {"statistics": 0.0, "anchored": 0.0, "refinement": 0.0}
    eighs_before = dataclasses.replace(geometry.EIGH_COUNT)
    outcome = _Outcome()
    overlap = execution.overlap(placement.device)
    with Spill(execution.scratch, execution.keep_bytes) as spill:
        route = Route(placement, spill, Comm.current(), progress)
        originals = _Originals(model, list(shapes), spill) \
            if config.cut == "anchored" and config.steps > 1 else None
        try:
            for step in range(1, config.steps + 1):
                cut = _Cut(model, config, metric, route, list(shapes), execution, seconds,
                           overlap)
                plan = _plan(cut, config.ratio * step / config.steps,
                             fitness if step == config.steps else None, calib, originals)
                outcome = _run(plan, cut, calib, precomputed)
        finally:
            overlap.close()
        spilled = spill.written
    fuse_causal_lm(model)
    t_total = time.perf_counter() - t0

    ranks = ranks_of(model, shapes)
    summary = Summary(metric=config.metric, requested_ratio=config.ratio,
                      achieved_ratio=allocate.achieved_ratio(shapes, ranks), ranks=ranks,
                      shapes=shapes, dense_params=sum(m * n for m, n in shapes.values()),
                      compressed_params=allocate.kept_params(shapes, ranks),
                      calibration_tokens=tokens, predicted_loss=outcome.predicted,
                      seconds={**seconds, "projection": t_total - seconds["statistics"]
                               - seconds["anchored"], "total": t_total},
                      search=outcome.searched, spilled_bytes=spilled, plan=outcome.plan,
                      refinement=outcome.refinement,
                      decompositions=dataclasses.asdict(geometry.EIGH_COUNT.since(eighs_before)))
    log.info("compressed %d layers with %s (%s cut): ratio %.4f achieved (%.4f requested) "
             "in %.1f s", len(shapes), config.metric, summary.plan, summary.achieved_ratio,
             config.ratio, t_total)
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


@dataclass
class _Outcome:
    plan: str = ""
    predicted: float = 0.0                  # the cut's predicted loss
    searched: SearchResult | None = None
    refinement: dict[int, tuple[float, float]] = field(default_factory=dict)


def _plan(cut: "_Cut", ratio: float, fitness, calib, originals) -> "_Plan":
    """The one plan a cut takes (see the module docstring)."""
    if cut.config.cut == "anchored":
        return Anchored(cut, ratio, fitness, calib, originals)
    if cut.allocation.needs_spectra:
        return Parked(cut, ratio, fitness)
    return Immediate(cut, cut.ranks({}, ratio))


def _run(plan: "_Plan", cut: "_Cut", calib, precomputed) -> _Outcome:
    for block in cut.statistics(plan.wants, calib, precomputed):
        plan.block(block)
    return plan.finish()


class _Cut:
    """What every plan of one cut shares: the model and its targeted layers, the recipe,
    the route the work takes, and what is done to layers (decompose, swap)."""

    def __init__(self, model: nn.Module, config: CompressConfig, metric: metrics.Metric,
                 route: Route, names: list[str], execution: Execution, seconds: dict,
                 overlap: Inline | Beside):
        self.model, self.config, self.metric, self.route = model, config, metric, route
        self.execution, self.seconds, self.overlap = execution, seconds, overlap
        self.allocation = ALLOCATIONS[config.allocation]
        self.layers = {name: model.get_submodule(name) for name in names}

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: linear_shape(l) for name, l in self.layers.items()}

    def ranks(self, spectra: dict[str, torch.Tensor], ratio: float) -> dict[str, int | None]:
        """The allocation's ranks, in each layer's rank steps, with the explicit overrides."""
        c, shapes = self.config, self.shapes
        multiples = allocate.rank_multiples(shapes, c.rank_multiple)
        return allocate.apply_rank_pattern(
            self.allocation.choose(shapes, spectra, ratio, c.min_rank, multiples),
            shapes, c.rank_pattern)

    def batches(self, calib) -> list[torch.Tensor]:
        return list(calib.split(self.execution.batch_size))

    def statistics(self, wants: Wants, calib, precomputed) -> Iterator[BlockStatistics]:
        """Block by block: walked, given, or none (svd)."""
        t0 = time.perf_counter()
        if precomputed is not None or not self.metric.needs_calibration:
            for k, names in enumerate(names_by_block(self.model, self.layers)):
                if names:
                    yield BlockStatistics(k, names, {n: precomputed[n] for n in names}
                                          if precomputed else {})
            return
        for block in walk(self.model, self.layers, self.batches(calib), self.route, wants):
            self.seconds["statistics"] += time.perf_counter() - t0
            yield block
            t0 = time.perf_counter()
        self.seconds["statistics"] += time.perf_counter() - t0

    def wants(self, **more) -> Wants:
        return Wants(inputs=self.metric.inputs, gradients=self.metric.gradients,
                     seed=self.execution.seed, **more)

    def solve(self, names: list[str], problem: Callable[[str], tuple[torch.Tensor, dict]],
              ranks: dict[str, int] | None) -> dict[str, tuple]:
        """{name: (spectrum on the CPU, B, A)} of the layers' projection problems (problem(name)
        = (W, decompose's keyword arguments)), with factors of rank ranks[name] (None:
        spectra only, from eigenvalues alone); the same-sized ones decomposed in one batch.
        Under torchrun the layers are spread over the processes (each forms only its own
        problems) and broadcast from their owners."""
        solved: dict[str, tuple] = {}
        self.hand_over(names, problem, ranks, solved.update, Inline())
        return solved

    def hand_over(self, names: list[str], problem, ranks: dict[str, int] | None,
                  then: Callable[[dict], None], overlap: Inline | Beside) -> None:
        """`solve`, its decompositions run by `overlap` (beside the walk or at once), its
        result given to `then` in this thread. The problems are formed here, so they hold
        the weights and statistics as they are now, whatever the walk does next."""
        mine = names[self.route.comm.rank::self.route.comm.size]
        problems = [problem(n) for n in mine]
        overlap.submit(lambda: self._decompose(mine, problems, ranks),
                       lambda done: then(self._shared(names, done, ranks)))

    def _decompose(self, mine: list[str], problems: list, ranks: dict[str, int] | None) -> dict:
        """This process's share of a block's layers decomposed: no collectives, no state."""
        out, before = {}, dataclasses.replace(geometry.EIGH_COUNT)
        if ranks is None:      # an allocation's spectra: eigenvalues only
            for name, spectrum in zip(mine, geometry.spectra_many(problems, self.config.damping)):
                out[name] = (spectrum.values.to("cpu"), None, None)
        else:
            for name, d in zip(mine, geometry.decompose_many(problems, self.config.damping)):
                B = A = None
                if ranks[name] >= 1:
                    dtype = held_by(self.layers[name]).dtype
                    B, A = (t.to(dtype) for t in d.factors(ranks[name]))
                out[name] = (d.spectrum.to("cpu"), B, A)
        done = geometry.EIGH_COUNT.since(before)
        log.info("%d layers from %s: %d eigendecompositions (%d eigenvalues only, %d redone in "
                 "float64) in %.2f s", len(mine), mine[0] if mine else "-", done.decompositions,
                 done.values_only, done.float64_redos, done.seconds)
        return out

    def problem(self, name: str, stats: LayerStats | None) -> tuple[torch.Tensor, dict]:
        """A layer's plain projection problem in the metric."""
        layer = self.layers[name]
        W = self.route.placement.to_device(linear_weight(layer).detach())
        return W, self.metric.statistics(linear_shape(layer), **(stats.matrices() if stats else {}))

    def _shared(self, names: list[str], mine: dict, ranks: dict[str, int] | None) -> dict:
        """Every process's decompositions of a block, broadcast from their owners."""
        comm, out, device = self.route.comm, {}, self.route.placement.device
        for j, name in enumerate(names):
            owner, (m, n) = j % comm.size, linear_shape(self.layers[name])
            spectrum, B, A = mine.get(name, (None, None, None))
            got = [comm.broadcast(spectrum, (min(m, n),), torch.float64, owner, "cpu")]
            if ranks is not None and ranks[name] >= 1:
                dtype, r = held_by(self.layers[name]).dtype, ranks[name]
                got += [comm.broadcast(B, (m, r), dtype, owner, device),
                        comm.broadcast(A, (r, n), dtype, owner, device)]
            out[name] = (*got, None, None)[:3]
        return out

    def swap(self, name: str, rank: int, B, A, spectrum) -> float:
        """Put the rank-`rank` factors in place of the layer (whose dense weight is then
        freed); the predicted loss of the cut."""
        new = LowRankLinear.from_linear(self.layers[name], A[:rank], B[:, :rank])
        set_module(self.model, name, new)
        self.layers[name] = new
        return float(spectrum[rank:].sum())

    def cuts(self, name: str, rank: int | None) -> bool:
        """A layer is cut when given a rank, and only ever further."""
        layer = self.layers[name]
        return rank is not None and not (isinstance(layer, LowRankLinear) and rank >= layer.rank)

    def cap(self, name: str) -> int:
        """The largest rank a layer can be given: one that still saves parameters, and never
        more than it has (a factored layer is only ever cut further)."""
        layer = self.layers[name]
        top = max_useful_rank(*linear_shape(layer))
        return min(top, layer.rank) if isinstance(layer, LowRankLinear) else top


class _Plan:
    """One way a cut goes: what the walk collects, each block's statistics as they arrive,
    the end."""
    wants: Wants

    def block(self, block: BlockStatistics) -> None:
        raise NotImplementedError

    def finish(self) -> _Outcome:
        raise NotImplementedError


class Immediate(_Plan):
    """Ranks known up front: each block is cut as soon as its statistics arrive."""

    def __init__(self, cut: _Cut, ranks: dict[str, int | None]):
        self.cut, self.known, self.predicted = cut, ranks, 0.0
        self.wants = cut.wants()

    def block(self, block: BlockStatistics) -> None:
        cut = self.cut
        wanted = [n for n in block.names if cut.cuts(n, self.known[n])]
        problem = lambda n: cut.problem(n, block.layers.get(n))      # noqa: E731
        for name, (spectrum, B, A) in cut.solve(wanted, problem, self.known).items():
            self.predicted += cut.swap(name, self.known[name], B, A, spectrum)

    def finish(self) -> _Outcome:
        return _Outcome("immediate", self.predicted)


class Parked(_Plan):
    """Ranks from every layer's spectrum: spectra kept, factors parked on disk up to each
    layer's cap (or not at all, `park=False`: spectra only), allocated (and searched) at
    the end, then cut from the parked rows."""

    def __init__(self, cut: _Cut, ratio: float, fitness, park: bool = True):
        self.cut, self.ratio, self.fitness, self.park = cut, ratio, fitness, park
        self.spectra: dict[str, torch.Tensor] = {}
        self.wants = cut.wants()

    def block(self, block: BlockStatistics) -> None:
        cut = self.cut
        problem = lambda n: cut.problem(n, block.layers.get(n))      # noqa: E731
        caps = {n: cut.cap(n) for n in block.names} if self.park else None
        cut.hand_over(block.names, problem, caps, self._keep, cut.overlap)

    def _keep(self, solved: dict[str, tuple]) -> None:
        for name, (spectrum, B, A) in solved.items():
            self.spectra[name] = spectrum
            if B is not None:
                self.cut.route.spill.put(f"factors.{name}", {"B_t": B.T, "A": A})

    def chosen(self) -> tuple[dict[str, int | None], SearchResult | None]:
        """The allocation's ranks, refined by the search when it runs."""
        self.cut.overlap.drain()
        ranks = self.cut.ranks(self.spectra, self.ratio)
        if self.fitness is None:
            return ranks, None
        searched = self._search(ranks)
        return searched.ranks, searched

    def finish(self) -> _Outcome:
        ranks, searched = self.chosen()
        predicted = sum(self.cut.swap(name, rank, *self._parked(name, rank), self.spectra[name])
                        for name, rank in ranks.items() if self.cut.cuts(name, rank))
        return _Outcome("parked", predicted, searched)

    def _parked(self, name: str, rank: int):
        """(B, A) of rank `rank` from a layer's parked factors (only those rows are read)."""
        spill = self.cut.route.spill
        return (spill.get(f"factors.{name}", "B_t", rank).T,
                spill.get(f"factors.{name}", "A", rank))

    def _search(self, ranks) -> SearchResult:
        cut, c = self.cut, self.cut.config
        caps = {k: l.rank for k, l in cut.layers.items() if isinstance(l, LowRankLinear)}
        return search_ranks(cut.model, cut.layers, self._parked, cut.shapes, ranks,
                            *self.fitness, generations=c.search_generations,
                            seconds=c.search_seconds, offspring=c.search_offspring,
                            min_rank=c.min_rank, caps=caps,
                            multiples=allocate.rank_multiples(cut.shapes, c.rank_multiple),
                            seed=cut.execution.seed, progress=cut.route.progress)


class Anchored(_Plan):
    """Ranks as Immediate or Parked would choose them; then the two-stream walk, each group
    of layers cut in the anchored metric and each block refined (module docstring)."""

    def __init__(self, cut: _Cut, ratio: float, fitness, calib, originals: "_Originals | None"):
        self.cut, self.calib, self.originals = cut, calib, originals
        self.choice = Parked(cut, ratio, fitness, park=fitness is not None) \
            if cut.allocation.needs_spectra else None
        self.known = None if self.choice else cut.ranks({}, ratio)
        refines = cut.config.refine_steps > 0 and cut.metric.gradients == "full"
        self.wants = Wants(inputs=self.choice is not None, gradients=cut.metric.gradients,
                           output_fisher=refines, seed=cut.execution.seed)
        self.fisher: dict[int, bool] = {}

    def block(self, block: BlockStatistics) -> None:
        if self.choice is not None:
            self.choice.block(block)
        spill = self.cut.route.spill
        for name in block.names:
            side = {k: v for k, v in block.layers[name].matrices(GRADIENT_SIDE).items()
                    if v is not None}
            if side:
                spill.put(f"gradients.{name}", side)
        if block.output_fisher is not None:
            spill.put(f"output_fisher.{block.index}", {"F": block.output_fisher})
            self.fisher[block.index] = True

    def finish(self) -> _Outcome:
        ranks, searched = self.choice.chosen() if self.choice else (self.known, None)
        cut, c = self.cut, self.cut.config
        outcome = _Outcome("anchored", 0.0, searched)
        t0 = time.perf_counter()
        names = [n for n in cut.layers]
        for event in walk_streams(cut.model, names, cut.batches(self.calib), cut.route,
                                  self._reference):
            if isinstance(event, GroupInputs):
                outcome.predicted += self._cut_group(event, ranks)
            elif c.refine_steps:
                t1 = time.perf_counter()
                outcome.refinement[event.index] = self._refine(event)
                cut.seconds["refinement"] += time.perf_counter() - t1
        cut.seconds["anchored"] += time.perf_counter() - t0
        return outcome

    def _reference(self, k: int, block: nn.Module) -> nn.Module:
        """The dense block k: a copy of the block before its cut, with the layers as
        compress_ found them when an earlier cut has replaced them."""
        ref = copy.deepcopy(block)
        if self.originals is not None:
            self.originals.restore(ref, block, self.cut.model, self.cut.route.placement.device)
        return ref

    def _cut_group(self, group: GroupInputs, ranks: dict[str, int | None]) -> float:
        cut = self.cut
        wanted = [n for n in group.names if cut.cuts(n, ranks[n])]
        if not wanted:
            return 0.0
        spill, device = cut.route.spill, cut.route.placement.device
        root = geometry.cholesky_root(group.cov, cut.config.anchor_damping)

        def problem(name):
            layer = cut.layers[name]
            side = {k: v.to(device) for k, v in spill.read(f"gradients.{name}").items()} \
                if cut.metric.gradients else {}
            return geometry.anchored(linear_weight(layer).detach(), group.cov, group.cross, root,
                                     mix=cut.config.anchor_mix,
                                     **cut.metric.output_side(linear_shape(layer), **side))
        solved = cut.solve(wanted, problem, ranks)
        for name in group.names:
            spill.drop(f"gradients.{name}")
        return sum(cut.swap(name, ranks[name], B, A, spectrum)
                   for name, (spectrum, B, A) in solved.items())

    def _refine(self, stream: BlockStream) -> tuple[float, float]:
        cut, c = self.cut, self.cut.config
        fisher = cut.route.spill.take(f"output_fisher.{stream.index}")["F"].to(
            cut.route.placement.device) if self.fisher.get(stream.index) else None
        windows = c.refine_windows or stream.total * cut.execution.batch_size
        return refine_block(stream, fisher, c.refine_steps, c.refine_lr, cut.route.comm,
                            cut.execution.seed, -(-windows // cut.execution.batch_size))


class _Originals:
    """The targeted layers as compress_ found them, parked on disk: the dense reference of
    the anchored cuts after the first (when the model holds their earlier cuts)."""

    def __init__(self, model: nn.Module, names: list[str], spill: Spill):
        self.spill, self.skeletons = spill, {}
        for name in names:
            layer = model.get_submodule(name)
            spill.put(f"original.{name}", layer.state_dict())
            self.skeletons[name] = copy.deepcopy(layer).to("meta")

    def restore(self, ref: nn.Module, block: nn.Module, model: nn.Module, device) -> None:
        """Put the original layers of `block` (a block of `model`) into its copy `ref`."""
        within = {id(m): n for n, m in block.named_modules()}
        for name, module in model.named_modules():
            if id(module) in within and name in self.skeletons:
                layer = copy.deepcopy(self.skeletons[name]).to_empty(device=device)
                layer.load_state_dict(self.spill.read(f"original.{name}"))
                set_module(ref, within[id(module)], layer)
