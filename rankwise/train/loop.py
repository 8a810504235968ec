"""Fine-tuning under a rank constraint, three ways, to one final parameter budget.

  factors  one-shot compression (compress_: the metric, spectrum allocation), then train
           the factors A, B;
  hard     train the dense weights and, every `prox_every` steps, truncate each to the
           ranks a global allocation gives at the final budget (Trained Rank Pruning);
  svt      proximal gradient with a nuclear-norm penalty: every `prox_every` steps
           soft-threshold every weight's singular values by tau = lr * lambda * prox_every
           (iterative singular value thresholding; `shrink` and `penalty` offer less
           biased variants). lambda is either fixed (the textbook algorithm, which
           converges for a small enough step) or set at every proximal step by a
           controller so that the kept parameters follow a cubic schedule from dense to
           the budget.

The proximal step and the truncations work in a metric (svd: Euclidean; whiten: input
covariance C; fisher: diag G on the output side; kfac: G on the output side and C on the
input side), i.e. on the singular values of L^{1/2} W R^{1/2} (rankwise.train.prox): the
prox is then taken in the norm that approximates the KL to the dense model, the
variable-metric proximal step. hard and svt end with an exact
cut to factors at the budget (global allocation over the metric's squared singular values)
and a recovery phase that trains the factors, so all three methods take the same number
of optimizer steps on the same batches and end at the same budget.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .. import geometry
from ..forms import allocate
from ..models.layers import (LowRankLinear, linear_shape, linear_weight, params_at, ranks_of,
                             set_module)
from ..statistics import metrics
from . import svt
from .config import FinetuneConfig, check_resume
from .prox import (budget_threshold, cubic_schedule, metric_roots, penalty_weights,
                   removed_loss, thresholded, truncated)
from .runner import Runner, load_checkpoint, training

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step: int
    loss: float
    params: int                       # targeted layers' parameters (kept ranks)
    lam: float | None = None
    tau: float | None = None
    objective: float | None = None    # loss + lam * nuclear norm (fixed-lambda svt)
    # what a prox / truncation removed, 1/2 ||change||^2 in the metric (the predicted loss
    # rise, in the statistics' units), and the part of it spent shrinking kept directions
    prox_loss: float | None = None
    shrink_loss: float | None = None
    ranks: dict[str, int] | None = None


@dataclass
class FinetuneResult:
    config: FinetuneConfig
    history: list[StepRecord] = field(default_factory=list)
    ranks: dict[str, int | None] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    dense_params: int = 0
    final_params: int = 0
    seconds: float = 0.0

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.final_params / self.dense_params


class _Run:
    """The state of one fine-tuning run: model, optimizer, metric, schedule, history."""

    def __init__(self, model, task, config: FinetuneConfig, layers, progress: bool,
                 measure: bool = True):
        self.model, self.task, self.config, self.progress = model, task, config, progress
        self.names = list(layers)
        self.shapes = {k: linear_shape(l) for k, l in layers.items()}
        self.dense = sum(m * n for m, n in self.shapes.values())
        self.budget = (1 - config.ratio) * self.dense
        self.history: list[StepRecord] = []
        self.nuclear = 0.0              # after the last proximal step (fixed-lambda svt)
        self.kept_params = self.dense
        self.roots, self.collected = metric_roots(model, layers, task, config.metric,
                                                  config.damping, progress) \
            if measure else ({}, {})
        self.prox_steps = max(config.cut_step // config.prox_every, 1)
        self.weights = penalty_weights(self.shapes, config.penalty)
        if measure and config.method == "svt" and config.lam is not None:
            self.nuclear = sum(self.weights[k] * float(d.S.sum())
                               for k, d in self.decompositions().items())

    def layer(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def trainable(self) -> list[nn.Parameter]:
        return [p for name in self.names for p in self.layer(name).parameters()]

    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(self.trainable(), lr=c.lr, momentum=c.momentum)
        return torch.optim.AdamW(self.trainable(), lr=c.lr, weight_decay=0.0)

    def current_params(self) -> int:
        return allocate.kept_params(self.shapes, self.ranks())

    def decompositions(self) -> dict[str, svt.MetricSVD]:
        return {name: svt.metric_svd(linear_weight(self.layer(name)).detach(), *self.roots[name],
                                          dtype=torch.float32) for name in self.names}

    def prox(self, step: int, record: StepRecord) -> None:
        """One proximal step (svt) or truncation (hard) on every targeted weight."""
        c = self.config
        svds = self.decompositions()
        spectra = {k: d.S for k, d in svds.items()}
        if c.method == "hard":
            new, kept = truncated(spectra, self.shapes, c.ratio, c.min_rank)
        else:
            if c.lam is None:
                # layer k's threshold is tau * weights[k]: the budget is met on the scaled spectra
                k = (step + 1) // c.prox_every
                target = self.dense - (self.dense - self.budget) * cubic_schedule(k / self.prox_steps)
                tau = budget_threshold({k: s / self.weights[k] for k, s in spectra.items()},
                                       self.shapes, target, c.min_rank)
                record.lam = tau / (c.lr * c.prox_every)
            else:
                tau = c.lr * c.lam * c.prox_every
                record.lam = c.lam
            record.tau = tau
            new, kept = thresholded(spectra, self.weights, tau, c.shrink, c.min_rank)
            self.nuclear = sum(self.weights[k] * float(s.sum()) for k, s in new.items())
        with torch.no_grad():
            for name, s in new.items():
                linear_weight(self.layer(name)).copy_(svds[name].weight(s))
        record.prox_loss, record.shrink_loss = removed_loss(spectra, new)
        record.ranks = kept
        record.params = self.kept_params = sum(params_at(self.shapes[k], r) for k, r in kept.items())

    def cut(self) -> None:
        """Exact factors at the budget: global allocation over the metric's spectra (for
        `factors`, of the dense weights in the dense model's statistics: the one-shot cut)."""
        c = self.config
        if c.method == "factors":
            metric = metrics.get(c.metric)
            problems = [(linear_weight(self.layer(name)).detach(),
                         metric.statistics(self.shapes[name], **self.collected[name].matrices())
                         if self.collected else {}) for name in self.names]
            found = dict(zip(self.names, geometry.decompose_many(problems, c.damping)))
            spectra = {k: d.spectrum for k, d in found.items()}
        else:
            found = self.decompositions()
            spectra = {k: d.S.square() for k, d in found.items()}
        self.set_ranks(allocate.spectrum_ranks(self.shapes, spectra, c.ratio, c.min_rank), found)

    def set_ranks(self, ranks: dict[str, int | None], svds: dict | None = None) -> None:
        """Swap layers for LowRankLinear of the given ranks (factors from `svds`, or left
        uninitialised to be filled from a checkpoint)."""
        for name, rank in ranks.items():
            if rank is None:
                continue
            layer = self.layer(name)
            if svds is None:
                m, n = linear_shape(layer)
                new = LowRankLinear(n, m, rank, layer.bias is not None, dtype=layer.weight.dtype)
            else:
                B, A = svds[name].factors(rank)
                new = LowRankLinear.from_linear(layer, A.to(layer.weight.dtype),
                                                B.to(layer.weight.dtype))
            set_module(self.model, name, new)

    def ranks(self) -> dict[str, int | None]:
        return ranks_of(self.model, self.names)


def finetune(model: nn.Module, task, config: FinetuneConfig, layers: dict[str, nn.Module],
             checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50,
             resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune `model` in place under `config`, training only the targeted `layers`
    (their weights, then factors); the rest stays frozen. With `checkpoint`, the state is
    written there every `checkpoint_every` steps (atomically) and `resume` continues from
    it. Returns the per-step history and the final ranks."""
    t0 = time.perf_counter()
    check_resume(checkpoint, resume)
    if config.lr is None:
        config = dataclasses.replace(config, lr=task.default_lr)
    for p in model.parameters():
        p.requires_grad_(False)
    run = _Run(model, task, config, layers, progress, measure=not resume)
    start = 0
    if resume:
        start, optimizer_state = _resumed(run, checkpoint)
        optimizer = run.make_optimizer()
        optimizer.load_state_dict(optimizer_state)
    else:
        if config.cut_step == 0:
            run.cut()
        optimizer = run.make_optimizer()
    runner = Runner(model, task, config.steps, desc=f"fine-tuning ({config.method})",
                    progress=progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every)

    def state(step: int) -> dict:
        return {"step": step, "options": asdict(run.config), "ranks": run.ranks(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "history": [asdict(r) for r in run.history], "nuclear": run.nuclear,
                "kept_params": run.kept_params,
                "roots": {k: [None if r is None else (r.half, r.inv_half) for r in v]
                          for k, v in run.roots.items()}}
    for step in runner.steps(start, state):
        if step == config.cut_step and step > 0:
            run.cut()
            optimizer = run.make_optimizer()
        with training(model, run.trainable()):
            loss = runner.step(step, optimizer)
        # until the cut, the weights are dense but their kept ranks are the last prox's
        params = run.current_params() if step >= config.cut_step else run.kept_params
        record = StepRecord(step=step, loss=loss, params=params)
        if config.method == "svt" and config.lam is not None:
            record.objective = record.loss + config.lam * run.nuclear
        if config.method != "factors" and step < config.cut_step and (step + 1) % config.prox_every == 0:
            with torch.no_grad():
                run.prox(step, record)
        run.history.append(record)
    if config.cut_step == config.steps:       # no recovery phase: cut at the very end
        run.cut()
    ranks = run.ranks()
    result = FinetuneResult(config=config, history=run.history, ranks=ranks, shapes=run.shapes,
                            dense_params=run.dense,
                            final_params=allocate.kept_params(run.shapes, ranks),
                            seconds=time.perf_counter() - t0)
    log.info("%s fine-tuning: %d steps, ratio %.4f achieved (%.4f requested) in %.1f s",
             config.method, config.steps, result.achieved_ratio, config.ratio, result.seconds)
    return result


def _resumed(run: _Run, path) -> tuple[int, dict]:
    """Restore the run from a checkpoint; returns (next step, optimizer state)."""
    saved = load_checkpoint(path, asdict(run.config))
    run.set_ranks(saved["ranks"])
    run.model.load_state_dict(saved["model"])
    run.history = [StepRecord(**r) for r in saved["history"]]
    run.nuclear = saved["nuclear"]
    run.kept_params = saved["kept_params"]
    run.roots = {k: tuple(None if r is None else geometry.Root(*r) for r in v)
                 for k, v in saved["roots"].items()}
    return saved["step"], saved["optimizer"]


def history_json(result: FinetuneResult) -> str:
    return json.dumps([asdict(r) for r in result.history])
