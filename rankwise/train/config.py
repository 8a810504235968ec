"""Fine-tuning options: the method (FinetuneConfig); the run around it lives with its
entry point (rankwise.entrypoints.finetune.FinetuneRun, rankwise.lab.image_finetune)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import RankwiseError
from ..geometry import DEFAULT_DAMPING
from ..models.host import DEVICES, resolve_device
from ..options import check_bool, check_choice, check_int, check_number, option
from ..statistics.metrics import METRICS
from .svt import SHRINKS

METHODS = ("factors", "hard", "svt")
OPTIMIZERS = ("adamw", "sgd")
PENALTIES = ("nuclear", "weighted")


@dataclass
class FinetuneConfig:
    """How to train down to the budget (see rankwise.train.loop)."""
    method: str = option("svt", "factors (one-shot cut, then train the factors), hard (train "
                                "dense, truncate every --prox-every steps: TRP) or svt "
                                "(proximal gradient on the singular values)", choices=METHODS)
    ratio: float = option(0.5, "fraction of the targeted layers' parameters removed at the "
                               "end, in (0, 1)")
    metric: str = option("kfac", "metric of projections and proximal steps",
                         choices=METRICS)
    steps: int = option(200, "optimizer steps in all (recovery included)")
    prox_every: int = option(10, "steps between proximal steps / truncations")
    recovery_steps: int = option(40, "final steps training the exact factors (hard, svt)")
    lr: float | None = option(None, "learning rate (default: the task's, 1e-4 for a language "
                                    "model, 1e-3 for an image MLP)")
    optimizer: str = option("adamw", "adamw or sgd", choices=OPTIMIZERS)
    momentum: float = option(0.0, "sgd momentum")
    lam: float | None = option(None, "svt: fixed nuclear-norm weight (default: a controller "
                                     "that reaches the budget on a cubic schedule)")
    shrink: str = option("soft", "svt: soft (every singular value loses tau; the nuclear "
                                 "norm's prox), reweighted (s - tau^2/s: the same directions "
                                 "vanish, large ones barely move) or firm (0 up to tau, "
                                 "2(s - tau) up to 2 tau, s above)", choices=SHRINKS)
    penalty: str = option("nuclear", "svt: nuclear (one threshold for every layer) or "
                                     "weighted (layer thresholds scaled by sqrt(m+n): "
                                     "directions go in order of metric loss per parameter)",
                          choices=PENALTIES)
    min_rank: int = option(1, "smallest rank of a factorized layer")
    damping: float = option(DEFAULT_DAMPING, "relative eigenvalue damping of the metric's "
                                             "covariances")
    include: str | None = option(None, "regex: only target linear layers whose name matches")
    exclude: str | None = option(None, "regex: skip linear layers whose name matches")

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        if self.metric not in METRICS:
            raise RankwiseError(f"unknown metric {self.metric!r} for fine-tuning; choose one "
                                f"of {', '.join(METRICS)}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("shrink", self.shrink, SHRINKS)
        check_choice("penalty", self.penalty, PENALTIES)
        self.ratio = check_number("ratio", self.ratio, 0, 1)
        for name in ("steps", "prox_every", "min_rank"):
            check_int(name, getattr(self, name))
        if isinstance(self.recovery_steps, bool) or not isinstance(self.recovery_steps, int) \
                or not 0 <= self.recovery_steps < self.steps:
            raise RankwiseError(f"recovery_steps must be an integer in [0, steps={self.steps}), "
                                f"got {self.recovery_steps!r}")
        if self.lr is not None:
            self.lr = check_number("learning rate", self.lr, 0)
        if self.lam is not None:
            self.lam = check_number("lam", self.lam, 0, low_open=False)
        self.damping = check_number("damping", self.damping, 0, 1, low_open=False)
        check_number("momentum", self.momentum, 0, 1, low_open=False)

    @property
    def cut_step(self) -> int:
        """The step before which hard / svt cut to exact factors (factors: at 0)."""
        return 0 if self.method == "factors" else self.steps - self.recovery_steps


@dataclass
class TrainingRun:
    """Where a training run runs and how it survives an interruption; the runs of the
    verbs that train (FinetuneRun, HealRun, the lab's ImageRun) add what they read and
    write."""
    device: str = option("cpu", f"where to train: {DEVICES}")
    seed: int = option(0, "seed of the data and of the batch order")
    checkpoint: str | None = option(None, "checkpoint file, written every --checkpoint-every "
                                          "steps and at the end")
    checkpoint_every: int = option(50, "steps between checkpoints")
    resume: bool = option(False, "continue from --checkpoint")
    cache: bool = option(True, "reuse what an earlier run computed (a GGUF model converted, "
                               "windows sampled for self calibration) from the user's cache "
                               "folder (--no-cache computes everything afresh)")

    def __post_init__(self):
        check_int("seed", self.seed, 0)
        check_int("checkpoint_every", self.checkpoint_every)
        check_bool("resume", self.resume)
        check_bool("cache", self.cache)
        resolve_device(self.device)
        check_resume(self.checkpoint, self.resume)


def check_resume(checkpoint, resume: bool) -> None:
    if resume and (checkpoint is None or not Path(checkpoint).is_file()):
        raise RankwiseError(f"no checkpoint to resume from at {checkpoint}")
