"""Fine-tuning options: the method (FinetuneConfig) and the run around it (FinetuneRun)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import RankwiseError
from ..geometry import DEFAULT_DAMPING, SHRINKS
from ..metrics import METRICS
from ..models import DEVICES, resolve_device
from ..options import check_bool, check_choice, check_int, check_number, option

METHODS = ("factors", "hard", "svt")
OPTIMIZERS = ("adamw", "sgd")
PENALTIES = ("nuclear", "weighted")
TASKS = ("lm", "digits", "mnist")     # a causal LM, or an image data set (rankwise.lab)
OBJECTIVES = ("lm", "distill")


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
class FinetuneRun:
    """What a fine-tuning run trains on, where it runs and what it keeps."""
    task: str = option("lm", "lm (a causal LM) or an image data set (digits, mnist)",
                       choices=TASKS)
    model: str | None = option(None, "lm: Hugging Face folder or .gguf (default: the "
                                     "embedded SmolLM2-135M-Instruct)")
    text: str | None = option(None, "lm: training text (default: the shipped WikiText-2 "
                                    "validation split)")
    batch_size: int | None = option(None, "windows (lm, default 2) or images (default 128) "
                                          "per step")
    seqlen: int = option(256, "lm: tokens per training window")
    objective: str = option("lm", "lm: the training loss: lm (cross-entropy of the text) or "
                                  "distill (KL to the dense model's next-token distributions, "
                                  "so no domain adaptation enters the score)",
                            choices=OBJECTIVES)
    calib_samples: int = option(16, "lm: calibration windows from the held-out part")
    calib_seqlen: int = option(512, "lm: tokens per calibration and test window")
    holdout: float = option(0.2, "lm: final fraction of the training text kept for "
                                 "calibration, in (0, 1)")
    eval_windows: int = option(40, "lm: test windows")
    pretrain_epochs: int = option(15, "images: epochs training the dense MLP first")
    device: str = option("cpu", f"where to train: {DEVICES}")
    seed: int = option(0, "seed of batches and sampled labels")
    checkpoint: str | None = option(None, "checkpoint file, written every --checkpoint-every "
                                          "steps")
    checkpoint_every: int = option(50, "steps between checkpoints")
    resume: bool = option(False, "continue from --checkpoint")
    out: str | None = option(None, "output folder: model (lm), training.png, history.json",
                             required=True)

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        check_choice("objective", self.objective, OBJECTIVES)
        if self.objective != "lm" and self.task != "lm":
            raise RankwiseError(f"--objective {self.objective} is for a language model; "
                                f"the {self.task} task trains on its labels")
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size)
        for name in ("calib_samples", "eval_windows", "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("seqlen", self.seqlen, 2)
        check_int("calib_seqlen", self.calib_seqlen, 2)
        check_int("pretrain_epochs", self.pretrain_epochs, 0)
        check_int("seed", self.seed, 0)
        self.holdout = check_number("holdout", self.holdout, 0, 1)
        check_bool("resume", self.resume)
        resolve_device(self.device)
        check_resume(self.checkpoint, self.resume)


def check_resume(checkpoint, resume: bool) -> None:
    if resume and (checkpoint is None or not Path(checkpoint).is_file()):
        raise RankwiseError(f"no checkpoint to resume from at {checkpoint}")
