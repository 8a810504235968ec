"""The two-stream walk of a cut (rankwise.pipeline.streams) as a plan consumes it: each
group of layers made into its forms on the compressed stream as its inputs arrive, each
block refined toward the dense block's output, then its factors rounded.

  a group    each layer's kind (rankwise.forms.kinds) poses the problem its form needs and
             makes the form from the solution, through a GroupFit: factors fitted in the
             anchored metric (geometry.anchored); a weight to round rounded from its
             anchored target (the full-rank weight that, fed the compressed stream, gives
             the outputs the anchoring asks for) in the token-weighted covariance of the
             inputs it now gets; a correction fitted to what that rounding left, in the
             anchored metric;
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
from torch import nn

from .. import geometry
from ..forms.registry import Form
from ..forms.rounding import Rounded, round_weight
from ..models.layers import linear_shape, linear_weight
from ..pipeline.spill import Spill
from ..pipeline.streams import BlockStream, GroupInputs, measure_inputs, walk_streams
from ..train.refine import factor_parameters, refine_block
from .surgery import Recipe, Target, Work


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


class GroupFit:
    """What a kind needs to make its form for the layers of one group, on the inputs the
    group now gets: the anchored problem, the anchored target and its rounding, the
    residual problem of an error, and the surgery (module docstring)."""

    def __init__(self, recipe: Recipe, target: Target, work: Work, group: GroupInputs,
                 forms: dict[str, Form], parked: Consumed, root):
        self.recipe, self.target, self.work, self.group = recipe, target, work, group
        self.forms, self.parked, self.root = forms, parked, root
        self._targets: dict[str, torch.Tensor] = {}
        self._rounded: dict[str, Rounded] = {}

    def layer(self, name: str) -> nn.Module:
        return self.target.layers[name]

    def _side(self, name: str) -> dict[str, torch.Tensor]:
        """The layer's parked gradient side (its output metric), on the device."""
        if not self.recipe.metric.gradients:
            return {}
        return {k: v.to(self.work.device) for k, v in self.parked.read(f"gradients.{name}").items()}

    def anchored_problem(self, name: str):
        c, layer = self.recipe.config, self.layer(name)
        return geometry.anchored(linear_weight(layer).detach(), self.group.cov, self.group.cross,
                                 self.root, mix=c.anchor_mix,
                                 **self.recipe.metric.output_side(linear_shape(layer),
                                                                  **self._side(name)))

    def anchored_target(self, name: str) -> torch.Tensor:
        """The anchored target of layer `name` (float64)."""
        if name not in self._targets:
            self._targets[name] = geometry.anchored_target(
                linear_weight(self.layer(name)).detach(), self.group.cov, self.group.cross,
                self.root, self.recipe.config.anchor_mix)
        return self._targets[name]

    def round(self, name: str, weight: torch.Tensor, grid) -> Rounded:
        """`weight` rounded onto `grid` in the token-weighted covariance of the inputs layer
        `name` now gets, as the recipe rounds."""
        return round_weight(weight, self.group.weighted[name], grid, self.recipe.scale_dtype,
                            self.recipe.config.rounding)

    def rounded(self, name: str, form: Form) -> Rounded:
        """The anchored target rounded onto the form's grid (`round`)."""
        if name not in self._rounded:
            self._rounded[name] = self.round(name, self.anchored_target(name),
                                             form.grid(self.recipe.config.group_size))
        return self._rounded[name]

    def residual_problem(self, name: str, error: torch.Tensor):
        error = error.to(torch.float64)
        return error, geometry.residual_problem(error, self.root,
                                                self._side(name).get("grad_cov"))

    def put_factors(self, name: str, form: Form, B, A, spectrum) -> None:
        self.target.put_factors(name, form, B, A, spectrum)

    def put_rounded(self, name: str, form: Form) -> None:
        """The rounded weight in place, its predicted loss the error's whole norm in the
        anchored metric (what a correction of rank 0 leaves)."""
        rounded = self.rounded(name, form)
        error = self.anchored_target(name) - rounded.weight.to(torch.float64)
        predicted = geometry.metric_totals([self.residual_problem(name, error)])[0]
        self.target.put_rounded(name, form, rounded, predicted)

    def store(self, linear: nn.Linear, rounded: Rounded) -> None:
        self.target.store(linear, rounded)

    def install(self, name: str, new: nn.Module, form: Form, predicted: float) -> None:
        self.target.install(name, new, form, predicted)


class StreamPass:
    """The two-stream walk of a cut: each group made into its forms on the compressed
    stream, each block refined (when asked) and its factors rounded (module docstring)."""

    def __init__(self, recipe: Recipe, target: Target, work: Work, forms: dict[str, Form],
                 calib, reference, fisher: set[int], refine: bool,
                 parked: Consumed | None = None):
        self.recipe, self.target, self.work = recipe, target, work
        self.forms, self.calib, self.reference = forms, calib, reference
        self.fisher, self.refine = fisher, refine
        self.parked = parked or Consumed(work.spill)

    def run(self) -> dict[int, tuple[float, float]]:
        """The pass; returns each refined block's loss before and after its refinement."""
        work, refinement = self.work, {}
        t0 = time.perf_counter()
        weights = self._group_weights if self.recipe.budget.rounds else None
        for event in walk_streams(self.target.model, list(self.target.layers),
                                  work.batches(self.calib), work.route, self.reference, weights):
            if isinstance(event, GroupInputs):
                self._cut_group(event)
                continue
            if self.refine and factor_parameters(event.block):
                t1 = time.perf_counter()
                refinement[event.index] = self._refine(event)
                work.seconds["refinement"] += time.perf_counter() - t1
            self._round_factors(event)
        work.seconds["anchored"] += time.perf_counter() - t0
        return refinement

    def _weights(self, name: str) -> list[torch.Tensor]:
        """A layer's parked token weights, one tensor per batch of this process."""
        parked = self.parked.read(f"weights.{name}")
        return [parked[str(j)] for j in range(len(parked))]

    def _group_weights(self, name: str) -> list[torch.Tensor] | None:
        """The token weights of a layer whose weight is rounded when its group arrives."""
        form = self.forms[name]
        return self._weights(name) if form.rounds_weight and self.target.needs_fit(name, form) \
            else None

    def _cut_group(self, group: GroupInputs) -> None:
        wanted = [n for n in group.names if self.target.needs_fit(n, self.forms[n])]
        if wanted:
            self._make(group, wanted)
        for name in group.names:          # a layer whose factors round reads it once more
            if not self.forms[name].rounds_factors:
                self.parked.done(f"gradients.{name}")

    def _make(self, group: GroupInputs, wanted: list[str]) -> None:
        """The forms of a group's layers that need making, on the inputs it now gets."""
        c, target = self.recipe.config, self.target
        root = geometry.cholesky_root(group.cov, c.anchor_damping)
        target.made.damping(wanted, root.damping, c.anchor_damping)
        fit = GroupFit(self.recipe, target, self.work, group, self.forms, self.parked, root)
        # each problem is formed by the process that solves it
        to_solve = [n for n in wanted if self.forms[n].of.decomposed]
        solved = self.work.solve(target, to_solve,
                                 lambda n: self.forms[n].of.problem(fit, n, self.forms[n]),
                                 {n: self.forms[n].rank for n in to_solve})
        for name in wanted:
            self.forms[name].of.make(fit, name, self.forms[name], solved.get(name))

    def _refine(self, stream: BlockStream) -> tuple[float, float]:
        c, work = self.recipe.config, self.work
        fisher = self.parked.last_read(f"output_fisher.{stream.index}")["F"].to(work.device) \
            if stream.index in self.fisher else None
        windows = c.refine_windows or stream.total * work.batch_size
        return refine_block(stream, fisher, c.refine_steps, c.refine_lr, work.route.comm,
                            work.seed, -(-windows // work.batch_size))

    def _round_factors(self, stream: BlockStream) -> None:
        """The block's factors that its forms round, in the covariance of their inputs on
        the block as it now is; what the rounding changed priced in the metric (the
        layer's gradient side and that covariance) and added to its predicted loss; the
        block's outputs are then computed again."""
        names = [n for n in stream.names if self.forms[n].rounds_factors]
        gptq = self.recipe.config.rounding == "gptq"
        covariances = measure_inputs(stream, {n: self.target.layers[n] for n in names},
                                     {n: self._weights(n) for n in names} if gptq else None,
                                     self.work.route.comm) if names else {}
        for name in stream.names:
            self.parked.done(f"weights.{name}")
        for name in names:
            layer = self.target.layers[name]
            before = (layer.B.weight @ layer.A.weight).detach().to(torch.float64)
            self.target.round_factors(name, self.forms[name], covariances[name]["weighted"])
            after = (layer.B.weight @ layer.A.weight).detach().to(torch.float64)
            side = {k: v.to(self.work.device) for k, v in
                    self.parked.last_read(f"gradients.{name}").items()} \
                if self.recipe.metric.gradients else {}
            predicted = self.target.made.predicted
            predicted[name] = predicted.get(name, 0.0) + geometry.metric_totals(
                [(before - after, dict(left=side.get("grad_cov"),
                                       right=covariances[name]["plain"]))],
                self.recipe.config.damping)[0]
        if names:
            stream.outputs = None
