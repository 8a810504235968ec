"""The two-stream walk of a cut (rankwise.pipeline.streams) as a plan consumes it: each
group of layers made into its forms on the compressed stream as its inputs arrive, each
block refined toward the dense block's output, then its factors rounded.

  a group    factors fitted in the anchored metric (geometry.anchored); a weight to round
             rounded from its anchored target (the full-rank weight that, fed the
             compressed stream, gives the outputs the anchoring asks for) in the
             token-weighted covariance of the inputs it now gets; a correction fitted to
             what that rounding left, in the anchored metric;
  a block    its float factors and corrections trained (rankwise.train.refine), then the
             factors whose form rounds them rounded in the covariance of their inputs on
             the block as it now is, and the block's outputs computed again.
What the first walk parked (gradient sides, token weights, output Fishers) is read through
one of two modes chosen once: Consumed (let go as soon as read for the last time) or Kept
(a measurement's, read again by the next budget).
"""
from __future__ import annotations

import time

import torch

from . import geometry
from .cut import Cut
from .forms import Form
from .layers import linear_shape, linear_weight
from .pipeline.spill import Spill
from .pipeline.streams import BlockStream, GroupInputs, measure_inputs, walk_streams
from .rounding import round_weight
from .train.refine import factor_parameters, refine_block


class Consumed:
    """What a single compression does with what its first walk parked: each group let go
    once read for the last time."""

    def __init__(self, spill: Spill):
        self.spill = spill

    def read(self, group: str) -> dict[str, torch.Tensor]:
        return self.spill.read(group)

    def last_read(self, group: str) -> dict[str, torch.Tensor]:
        return self.spill.take(group)

    def done(self, group: str) -> None:
        self.spill.drop(group)


class Kept(Consumed):
    """A measurement's parked groups (plans.Measurement): read, never let go, for the next
    budget made from them."""

    def last_read(self, group: str) -> dict[str, torch.Tensor]:
        return self.spill.read(group)

    def done(self, group: str) -> None:
        pass


class StreamPass:
    """The two-stream walk of a cut: each group made into its forms on the compressed
    stream, each block refined (when asked) and its factors rounded (module docstring)."""

    def __init__(self, cut: Cut, forms: dict[str, Form], calib, reference, fisher: set[int],
                 refine: bool, parked: Consumed | None = None):
        self.cut, self.forms, self.calib, self.reference = cut, forms, calib, reference
        self.fisher, self.refine = fisher, refine
        self.parked = parked or Consumed(cut.route.spill)

    def run(self, outcome: Outcome) -> None:
        cut = self.cut
        t0 = time.perf_counter()
        weights = self._group_weights if cut.config.rounds else None
        for event in walk_streams(cut.model, list(cut.layers), cut.batches(self.calib),
                                  cut.route, self.reference, weights):
            if isinstance(event, GroupInputs):
                self._cut_group(event)
                continue
            if self.refine and factor_parameters(event.block):
                t1 = time.perf_counter()
                outcome.refinement[event.index] = self._refine(event)
                cut.seconds["refinement"] += time.perf_counter() - t1
            self._round_factors(event)
        cut.seconds["anchored"] += time.perf_counter() - t0

    def _weights(self, name: str) -> list[torch.Tensor]:
        """A layer's parked token weights, one tensor per batch of this process."""
        parked = self.parked.read(f"weights.{name}")
        return [parked[str(j)] for j in range(len(parked))]

    def _group_weights(self, name: str) -> list[torch.Tensor] | None:
        """The token weights of a layer whose weight is rounded when its group arrives."""
        form = self.forms[name]
        return self._weights(name) if form.rounds_weight and self.cut.needs_fit(name, form) \
            else None

    def _cut_group(self, group: GroupInputs) -> None:
        cut, c = self.cut, self.cut.config
        wanted = [n for n in group.names if cut.needs_fit(n, self.forms[n])]
        if not wanted:
            return
        device = cut.route.placement.device
        root = geometry.cholesky_root(group.cov, c.anchor_damping)
        cut.made.damping(wanted, root.damping, c.anchor_damping)
        targets = {n: geometry.anchored_target(linear_weight(cut.layers[n]).detach(), group.cov,
                                               group.cross, root, c.anchor_mix)
                   for n in wanted if self.forms[n].rounds_weight}
        rounded = {n: self._rounded(n, target, group.weighted[n]) for n, target in targets.items()}

        def problem(name):
            layer, form = cut.layers[name], self.forms[name]
            side = {k: v.to(device) for k, v in self.parked.read(f"gradients.{name}").items()} \
                if cut.metric.gradients else {}
            if form.factored:
                return geometry.anchored(linear_weight(layer).detach(), group.cov, group.cross,
                                         root, mix=c.anchor_mix,
                                         **cut.metric.output_side(linear_shape(layer), **side))
            error = targets[name] - rounded[name].weight.to(targets[name])
            return error, geometry.residual_problem(error, root, side.get("grad_cov"))
        to_solve = [n for n in wanted if self.forms[n].rank is not None]
        solved = cut.solve(to_solve, problem, {n: self.forms[n].rank for n in to_solve})
        for name in wanted:
            form = self.forms[name]
            if form.factored:
                spectrum, _, B, A = solved[name]
                cut.put_factors(name, form, B, A, spectrum)
            elif form.kind == "corrected":
                spectrum, _, B, A = solved[name]
                cut.put_corrected(name, form, rounded[name], B, A, spectrum)
            else:
                cut.put_rounded(name, form, rounded[name], 0.0)
        for name in group.names:
            self.parked.done(f"gradients.{name}")

    def _rounded(self, name: str, target: torch.Tensor, H: torch.Tensor):
        """A weight rounded on the compressed stream: its anchored target (the weight that
        gives, fed this stream, the outputs the anchoring asks for) in the token-weighted
        covariance of the inputs it now gets."""
        c = self.cut.config
        return round_weight(target, H, self.forms[name].grid(c.group_size),
                            self.cut.scale_dtype, c.rounding)

    def _refine(self, stream: BlockStream) -> tuple[float, float]:
        cut, c = self.cut, self.cut.config
        fisher = self.parked.last_read(f"output_fisher.{stream.index}")["F"].to(
            cut.route.placement.device) if stream.index in self.fisher else None
        windows = c.refine_windows or stream.total * cut.batch_size
        return refine_block(stream, fisher, c.refine_steps, c.refine_lr, cut.route.comm,
                            cut.seed, -(-windows // cut.batch_size))

    def _round_factors(self, stream: BlockStream) -> None:
        """The block's factors that its forms round, in the covariance of their inputs on
        the block as it now is; the block's outputs are then computed again."""
        cut = self.cut
        names = [n for n in stream.names if self.forms[n].rounds_factors]
        covariances = {}
        if names and cut.config.rounding == "gptq":
            covariances = measure_inputs(stream, {n: cut.layers[n] for n in names},
                                         {n: self._weights(n) for n in names},
                                         cut.route.comm)
        for name in stream.names:
            self.parked.done(f"weights.{name}")
        for name in names:
            cut.round_factors(name, self.forms[name], covariances.get(name))
        if names:
            stream.outputs = None


