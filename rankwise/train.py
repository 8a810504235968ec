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
covariance C; kfac: G on the output side and C on the input side), i.e. on the singular
values of L^{1/2} W R^{1/2}: the prox is then taken in the norm that approximates the
KL to the dense model, the variable-metric proximal step. hard and svt end with an exact
cut to factors at the budget (global allocation over the metric's squared singular values)
and a recovery phase that trains the factors, so all three methods take the same number
of optimizer steps on the same batches and end at the same budget.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocate, geometry, stats
from .compress import compress_
from .config import CompressConfig
from .errors import RankwiseError
from .layers import LowRankLinear, dense_params, factored_params, max_useful_rank
from .models import set_module

log = logging.getLogger(__name__)

METHODS = ("factors", "hard", "svt")
PROX_METRICS = ("svd", "whiten", "kfac")
OPTIMIZERS = ("adamw", "sgd")
SHRINKS = ("soft", "reweighted", "firm")
PENALTIES = ("nuclear", "weighted")


@dataclass
class FinetuneConfig:
    """method: factors | hard | svt (see the module docstring).
    ratio: fraction of the targeted layers' parameters removed at the end, in (0, 1).
    metric: where projections and proximal steps are taken: svd, whiten or kfac.
    steps: optimizer steps in all (recovery included). prox_every: steps between proximal
    steps / truncations. recovery_steps: final steps that train the exact factors (hard
    and svt; factors trains factors throughout). lr; optimizer: adamw or sgd (with
    `momentum`). lam: fixed nuclear-norm weight for svt (None: the budget controller).
    shrink: soft (the nuclear norm's prox: every singular value loses tau) or reweighted
    (sigma -> sigma - tau^2 / sigma above tau: one step of the reweighted nuclear norm,
    zeroing the same directions while barely moving the large ones) or firm (the prox of
    the minimax concave penalty: zero up to tau, 2 (sigma - tau) up to 2 tau, unchanged
    above). penalty: nuclear (lambda * sum of every layer's nuclear norm) or weighted
    (layer l's nuclear norm weighted by sqrt(m_l + n_l), the parameters one of its
    directions costs, over the mean: the prox then drops directions in order of metric
    loss per parameter, the order of the final cut's global allocation). min_rank:
    smallest rank of a factorized layer. include / exclude: regexes narrowing the targeted layers.
    """
    method: str = "svt"
    ratio: float = 0.5
    metric: str = "kfac"
    steps: int = 200
    prox_every: int = 10
    recovery_steps: int = 40
    lr: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.0
    lam: float | None = None
    shrink: str = "soft"
    penalty: str = "nuclear"
    min_rank: int = 1
    damping: float = geometry.DEFAULT_DAMPING
    include: str | None = None
    exclude: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise RankwiseError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.metric not in PROX_METRICS:
            raise RankwiseError(f"unknown metric {self.metric!r} for fine-tuning; choose one of "
                                f"{', '.join(PROX_METRICS)}")
        if self.optimizer not in OPTIMIZERS:
            raise RankwiseError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not 0 < float(self.ratio) < 1:
            raise RankwiseError(f"ratio must be in (0, 1) (the fraction of parameters removed), got {self.ratio}")
        for name in ("steps", "prox_every", "min_rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RankwiseError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.recovery_steps, int) or not 0 <= self.recovery_steps < self.steps:
            raise RankwiseError(f"recovery_steps must be an integer in [0, steps={self.steps}), "
                                f"got {self.recovery_steps!r}")
        if not self.lr > 0:
            raise RankwiseError(f"learning rate must be positive, got {self.lr}")
        if self.shrink not in SHRINKS:
            raise RankwiseError(f"unknown shrink {self.shrink!r}; choose one of {', '.join(SHRINKS)}")
        if self.penalty not in PENALTIES:
            raise RankwiseError(f"unknown penalty {self.penalty!r}; choose one of {', '.join(PENALTIES)}")
        if self.lam is not None and not self.lam >= 0:
            raise RankwiseError(f"lam must be non-negative, got {self.lam}")

    @property
    def cut_step(self) -> int:
        """The step before which hard / svt cut to exact factors (factors: at 0)."""
        return 0 if self.method == "factors" else self.steps - self.recovery_steps


# ---------------------------------------------------------------- tasks

class LanguageTask:
    """Next-token loss on random windows (seeded, fixed per step) of a token stream; the
    calibration windows come from a held-out part of the text."""

    def __init__(self, train_ids: torch.Tensor, calibration: torch.Tensor, batch_size: int = 2,
                 seqlen: int = 256, steps: int = 200, seed: int = 0):
        if train_ids.numel() <= seqlen:
            raise RankwiseError(f"the training text has {train_ids.numel()} tokens, not more "
                                f"than one window of {seqlen}")
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, train_ids.numel() - seqlen, (steps, batch_size), generator=g)
        self.ids, self.seqlen, self.calibration = train_ids, seqlen, calibration
        self.forward = stats.lm_logits

    def batch(self, step: int) -> torch.Tensor:
        return torch.stack([self.ids[s:s + self.seqlen] for s in self.starts[step].tolist()])

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(model.device)
        return model(input_ids=batch, labels=batch, use_cache=False).loss

    def calibration_batches(self) -> list[torch.Tensor]:
        return list(self.calibration.split(4))


class ImageTask:
    """Cross-entropy on minibatches (seeded, fixed per step) of an image data set; the
    calibration batches are the first `calibration` training images."""

    def __init__(self, data, batch_size: int = 128, steps: int = 200, seed: int = 0,
                 calibration: int = 4000):
        g = torch.Generator().manual_seed(seed)
        n = len(data.y_train)
        epochs = math.ceil(steps * batch_size / n) + 1
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])
        self.index = order[:steps * batch_size].view(steps, batch_size) if batch_size <= n \
            else torch.arange(n).repeat(steps, 1)
        self.data, self.calibration = data, data.x_train[:calibration]

    @staticmethod
    def forward(model, x):
        return model(x.to(_device(model)))

    def batch(self, step: int):
        idx = self.index[step]
        return self.data.x_train[idx], self.data.y_train[idx]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        device = _device(model)
        return nn.functional.cross_entropy(model(x.to(device)), y.to(device))

    def calibration_batches(self) -> list[torch.Tensor]:
        return list(self.calibration.split(250))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- metric

def metric_roots(model: nn.Module, layers: dict[str, nn.Module], task, config: FinetuneConfig,
                 progress: bool = True) -> tuple[dict, dict]:
    """Per-layer (left, right) roots of the metric from the dense model's statistics, and
    the statistics themselves (for the one-shot `factors` projection)."""
    if config.metric == "svd":
        return {name: (None, None) for name in layers}, {}
    collected = stats.collect(model, layers, task.calibration_batches(), inputs=True,
                              gradients="full" if config.metric == "kfac" else None,
                              progress=progress, both_sides=True, forward=task.forward)
    shared = geometry.SharedRoots()
    roots = {}
    for name, s in collected.items():
        right = _float32(shared(s.input_cov, config.damping))
        left = _float32(shared(s.grad_cov, config.damping)) if config.metric == "kfac" else None
        roots[name] = (left, right)
    return roots, collected


def _float32(root: geometry.Root) -> geometry.Root:
    return geometry.Root(root.half.float(), root.inv_half.float())


# ---------------------------------------------------------------- proximal steps

def _layer_params(shape: tuple[int, int], rank: int) -> int:
    m, n = shape
    return dense_params(m, n) if rank > max_useful_rank(m, n) else factored_params(m, n, rank)


def budget_threshold(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                     target: float, min_rank: int = 1) -> float:
    """The smallest tau whose soft-thresholding keeps at most `target` parameters (a layer
    keeps the singular values above tau, at least min_rank; it counts as dense while its
    rank saves nothing)."""
    def kept(tau: float) -> int:
        return sum(_layer_params(shapes[k], max(int((s > tau).sum()), min_rank))
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


def shrink(s: torch.Tensor, tau: float, rule: str = "soft") -> torch.Tensor:
    """New singular values: soft (s - tau)_+, reweighted (s - tau^2 / s)_+, or firm
    (0 up to tau, 2 (s - tau) up to 2 tau, s above: the prox of the minimax concave
    penalty with gamma = 2, which leaves every direction above 2 tau unbiased)."""
    if rule == "soft" or tau == 0:
        return (s - tau).clamp_min(0)
    if rule == "firm":
        return torch.where(s > 2 * tau, s, 2 * (s - tau).clamp_min(0))
    return (s - tau * tau / s.clamp_min(tau)).clamp_min(0)


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


# ---------------------------------------------------------------- training

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
        self.shapes = {k: (l.out_features, l.in_features) for k, l in layers.items()}
        self.dense = sum(m * n for m, n in self.shapes.values())
        self.budget = (1 - config.ratio) * self.dense
        self.history: list[StepRecord] = []
        self.nuclear = 0.0              # after the last proximal step (fixed-lambda svt)
        self.kept_params = self.dense
        self.roots, self.collected = metric_roots(model, layers, task, config, progress) \
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

    def decompositions(self) -> dict[str, geometry.MetricSVD]:
        return {name: geometry.metric_svd(self.layer(name).weight.detach(), *self.roots[name],
                                          dtype=torch.float32) for name in self.names}

    def prox(self, step: int, record: StepRecord) -> None:
        """One proximal step (svt) or truncation (hard) on every targeted weight."""
        c = self.config
        svds = self.decompositions()
        spectra = {k: d.S for k, d in svds.items()}
        if c.method == "hard":
            ranks = allocate.spectrum_ranks(self.shapes, {k: s.square() for k, s in spectra.items()},
                                            c.ratio, c.min_rank)
            kept = {k: r or len(spectra[k]) for k, r in ranks.items()}
            new = {k: torch.where(torch.arange(len(s), device=s.device) < kept[k], s, torch.zeros_like(s))
                   for k, s in spectra.items()}
        else:
            # layer k's threshold is tau * weights[k]: threshold the scaled spectra by tau
            scaled = {k: s / self.weights[k] for k, s in spectra.items()}
            if c.lam is None:
                k = (step + 1) // c.prox_every
                target = self.dense - (self.dense - self.budget) * cubic_schedule(k / self.prox_steps)
                tau = budget_threshold(scaled, self.shapes, target, c.min_rank)
                record.lam = tau / (c.lr * c.prox_every)
            else:
                tau = c.lr * c.lam * c.prox_every
                record.lam = c.lam
            record.tau = tau
            new = {k: shrink(s, tau, c.shrink) * self.weights[k] for k, s in scaled.items()}
            kept = {k: max(int((s > 0).sum()), c.min_rank) for k, s in new.items()}
            self.nuclear = sum(self.weights[k] * float(s.sum()) for k, s in new.items())
        with torch.no_grad():
            for name, s in new.items():
                self.layer(name).weight.copy_(svds[name].weight(s))
        change = {k: (spectra[k] - s).double().square() for k, s in new.items()}
        record.prox_loss = 0.5 * sum(float(d.sum()) for d in change.values())
        record.shrink_loss = 0.5 * sum(float(d[new[k] > 0].sum()) for k, d in change.items())
        record.ranks = kept
        record.params = self.kept_params = sum(_layer_params(self.shapes[k], r) for k, r in kept.items())

    def cut(self) -> None:
        """Exact factors at the budget: global allocation over the metric's spectra."""
        c = self.config
        if c.method == "factors":
            compress_(self.model, CompressConfig(metric=c.metric, ratio=c.ratio,
                                                 allocation="spectrum", min_rank=c.min_rank,
                                                 damping=c.damping,
                                                 include=_names_regex(self.names)),
                      precomputed=self.collected or None, progress=False)
            return
        svds = self.decompositions()
        ranks = allocate.spectrum_ranks(self.shapes, {k: d.S.square() for k, d in svds.items()},
                                        c.ratio, c.min_rank)
        self.set_ranks(ranks, svds)

    def set_ranks(self, ranks: dict[str, int | None], svds: dict | None = None) -> None:
        """Swap layers for LowRankLinear of the given ranks (factors from `svds`, or left
        uninitialised to be filled from a checkpoint)."""
        for name, rank in ranks.items():
            if rank is None:
                continue
            layer = self.layer(name)
            if svds is None:
                new = LowRankLinear(layer.in_features, layer.out_features, rank,
                                    layer.bias is not None, dtype=layer.weight.dtype)
            else:
                B, A = svds[name].factors(rank)
                new = LowRankLinear.from_linear(layer, A.to(layer.weight.dtype),
                                                B.to(layer.weight.dtype))
            set_module(self.model, name, new)

    def ranks(self) -> dict[str, int | None]:
        return {n: self.layer(n).rank if isinstance(self.layer(n), LowRankLinear) else None
                for n in self.names}


def _names_regex(names: list[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def finetune(model: nn.Module, task, config: FinetuneConfig, layers: dict[str, nn.Module],
             checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 50,
             resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune `model` in place under `config`, training only the targeted `layers`
    (their weights, then factors); the rest stays frozen. With `checkpoint`, the state is
    written there every `checkpoint_every` steps (atomically) and `resume` continues from
    it. Returns the per-step history and the final ranks."""
    t0 = time.perf_counter()
    for p in model.parameters():
        p.requires_grad_(False)
    run = _Run(model, task, config, layers, progress, measure=not resume)
    start = 0
    if resume:
        if checkpoint is None or not Path(checkpoint).exists():
            raise RankwiseError(f"no checkpoint to resume from at {checkpoint}")
        start, optimizer_state = _load_checkpoint(run, checkpoint)
        optimizer = run.make_optimizer()
        optimizer.load_state_dict(optimizer_state)
    else:
        if config.cut_step == 0:
            run.cut()
        optimizer = run.make_optimizer()
    for p in run.trainable():
        p.requires_grad_(True)
    model.train()
    for step in tqdm(range(start, config.steps), desc=f"fine-tuning ({config.method})",
                     unit="step", disable=not progress, initial=start, total=config.steps):
        if step == config.cut_step and step > 0:
            run.cut()
            for p in run.trainable():
                p.requires_grad_(True)
            optimizer = run.make_optimizer()
        loss = run.task.loss(model, run.task.batch(step))
        if not torch.isfinite(loss):
            raise RankwiseError(f"the loss became {float(loss)} at step {step}; lower the "
                                f"learning rate (now {config.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # until the cut, the weights are dense but their kept ranks are the last prox's
        params = run.current_params() if step >= config.cut_step else run.kept_params
        record = StepRecord(step=step, loss=float(loss.detach()), params=params)
        if config.method == "svt" and config.lam is not None:
            record.objective = record.loss + config.lam * run.nuclear
        if config.method != "factors" and step < config.cut_step and (step + 1) % config.prox_every == 0:
            with torch.no_grad():
                run.prox(step, record)
        run.history.append(record)
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps):
            _save_checkpoint(run, optimizer, step + 1, checkpoint)
    if config.cut_step == config.steps:       # no recovery phase: cut at the very end
        run.cut()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ranks = run.ranks()
    result = FinetuneResult(config=config, history=run.history, ranks=ranks, shapes=run.shapes,
                            dense_params=run.dense,
                            final_params=allocate.kept_params(run.shapes, ranks),
                            seconds=time.perf_counter() - t0)
    log.info("%s fine-tuning: %d steps, ratio %.4f achieved (%.4f requested) in %.1f s",
             config.method, config.steps, result.achieved_ratio, config.ratio, result.seconds)
    return result


def _save_checkpoint(run: _Run, optimizer, step: int, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "config": asdict(run.config), "ranks": run.ranks(),
             "model": run.model.state_dict(), "optimizer": optimizer.state_dict(),
             "history": [asdict(r) for r in run.history], "nuclear": run.nuclear, "kept_params": run.kept_params,
             "roots": {k: [None if r is None else (r.half, r.inv_half) for r in v]
                       for k, v in run.roots.items()}}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(run: _Run, path) -> tuple[int, dict]:
    """Restore the run from a checkpoint; returns (next step, optimizer state)."""
    state = torch.load(path, weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k in {f.name for f in fields(FinetuneConfig)}}
    if saved != asdict(run.config):
        raise RankwiseError(f"checkpoint {path} was written with another configuration; "
                            "resume with the same options")
    run.set_ranks(state["ranks"])
    run.model.load_state_dict(state["model"])
    run.history = [StepRecord(**r) for r in state["history"]]
    run.nuclear = state["nuclear"]
    run.kept_params = state["kept_params"]
    run.roots = {k: tuple(None if r is None else geometry.Root(*r) for r in v)
                 for k, v in state["roots"].items()}
    return state["step"], state["optimizer"]


def history_json(result: FinetuneResult) -> str:
    return json.dumps([asdict(r) for r in result.history])
