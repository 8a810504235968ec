"""Healing a compressed model: train its factors (optionally norms and biases) to match
the dense teacher's next-token distributions, with a step and a time budget, checkpoints
and resume. The model keeps its architecture, so the result is an ordinary rankwise output.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import RankwiseError
from ..models.layers import LowRankLinear
from ..options import check_bool, check_int, check_number, option
from .config import check_resume
from .runner import Runner, load_checkpoint, training

log = logging.getLogger(__name__)


@dataclass
class HealConfig:
    """How long and how fast to heal, and what may change."""
    steps: int = option(200, "optimizer steps (the learning-rate schedule's length)")
    seconds: float | None = option(None, "stop after this many seconds of training "
                                         "(default: run all steps)")
    lr: float = option(3e-4, "peak AdamW learning rate (linear warm-up, cosine decay)")
    warmup_steps: int = option(10, "steps of linear warm-up")
    batch_size: int = option(4, "windows per step")
    teacher_topk: int = option(256, "cache the teacher's top-k log-probabilities per window "
                                    "once (0: run the teacher on every batch)")
    train_norms: bool = option(False, "also train the normalisation layers' weights")
    train_biases: bool = option(False, "also train the linear layers' biases")

    def __post_init__(self):
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("teacher_topk", self.teacher_topk, 0)
        self.lr = check_number("lr", self.lr, 0)
        if self.seconds is not None:
            self.seconds = check_number("seconds", self.seconds, 0)
        check_bool("train_norms", self.train_norms)
        check_bool("train_biases", self.train_biases)


@dataclass
class HealResult:
    config: HealConfig
    losses: list[float] = field(default_factory=list)   # KL to the teacher at every step
    seconds: float = 0.0                                # training time, resumed runs included
    trained_params: int = 0

    @property
    def steps(self) -> int:
        return len(self.losses)


def trainable_parameters(model: nn.Module, config: HealConfig) -> list[nn.Parameter]:
    """Every LowRankLinear's factors, and with the options the norms' and linears' biases
    and the norms' weights; nothing else moves (embeddings, dense layers, the head)."""
    chosen = {}
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            chosen.update({id(p): p for p in (module.A.weight, module.B.weight)})
        is_norm = "norm" in type(module).__name__.lower()
        if config.train_norms and is_norm:
            chosen.update({id(p): p for p in module.parameters(recurse=False)})
        bias = getattr(module, "bias", None)
        if config.train_biases and isinstance(bias, nn.Parameter) and not is_norm:
            chosen[id(bias)] = bias
    if not any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise RankwiseError("the model has no factorized layers to heal; compress it first")
    return list(chosen.values())


def _schedule(config: HealConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def heal(model: nn.Module, task, config: HealConfig, checkpoint=None, checkpoint_every: int = 50,
         resume: bool = False, progress: bool = True) -> HealResult:
    """Train `model` in place on `task` (a DistillTask: loss = KL to the teacher) under
    `config`; with `checkpoint`, the state is written there every `checkpoint_every` steps
    and at the end, and `resume` continues from it to the same state."""
    check_resume(checkpoint, resume)
    params = trainable_parameters(model, config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    result = HealResult(config, trained_params=sum(p.numel() for p in params))
    start, elapsed = 0, 0.0
    if resume:
        state = load_checkpoint(checkpoint, asdict(config))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result.losses, elapsed, start = state["losses"], state["seconds"], state["step"]
    runner = Runner(model, task, config.steps, desc="healing", progress=progress,
                    seconds=config.seconds, checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every, elapsed=elapsed)
    runner.losses = result.losses

    def state(step: int) -> dict:
        return {"step": step, "options": asdict(config), "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "losses": runner.losses, "seconds": runner.seconds}
    with training(model, params):
        for step in runner.steps(start, state):
            runner.step(step, optimizer, scheduler)
    result.seconds = runner.seconds
    log.info("healed %d parameters for %d steps in %.0f s: KL %.4f -> %.4f",
             result.trained_params, result.steps, result.seconds,
             result.losses[0] if result.losses else math.nan,
             result.losses[-1] if result.losses else math.nan)
    return result
