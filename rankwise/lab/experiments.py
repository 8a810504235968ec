"""The `rankwise dln` experiments: DLN vs C-DLN on recovery problems, where the wide
network's updates live, and the transfer to an MLP / ViT on shipped images."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..options import check_choices_of, check_int, check_number, option
from . import dln, plots
from .transfer import WIDE_LAYERS, run_transfer
from .vision import DATASETS, load_images

log = logging.getLogger(__name__)

EXPERIMENTS = ("recover", "subspace", "transfer")


@dataclass
class DlnConfig:
    experiment: str = option(None, "recover: error vs iteration and time, DLN vs C-DLN "
                                   "(curves.png); subspace: where the wide DLN's updates live "
                                   "(subspace.png); transfer: an MLP or ViT and its compressed "
                                   "version on images", choices=EXPERIMENTS, positional=True,
                             required=True)
    problems: list[str] = option(help="recovery problems (recover; subspace uses the first)",
                                 factory=lambda: list(dln.PROBLEMS), choices=dln.PROBLEMS)
    d: int = option(100, "target size d x d")
    rank: int = option(5, "target rank r")
    depth: int = option(3, "number of layers L")
    width: int | None = option(None, "compressed width r_hat (default 2r for recovery, 64 for "
                                     "transfer)")
    eps: float = option(1e-3, "initialisation scale")
    lr: float | None = option(None, "base learning rate (default 0.2 for recovery, 1e-3 Adam "
                                    "for transfer)")
    alpha: float | None = option(None, "outer layers' learning-rate multiplier (default 4 "
                                       "recovery, 2 transfer)")
    iterations: int = option(30000, "most iterations")
    tol: float = option(1e-3, "target relative error")
    measurements: int | None = option(None, "sensing: Gaussian measurements (default 3 d r)")
    observed: float = option(0.3, "completion: observed fraction of entries")
    noise: float = option(0.0, "observation noise std, relative to the observations' RMS")
    data: str = option("mnist", "transfer: image data set", choices=DATASETS)
    model: str = option("mlp", "transfer: network", choices=tuple(WIDE_LAYERS))
    epochs: int = option(20, "transfer: training epochs")
    warmup_steps: int = option(20, "transfer: wide-model steps before the spectral init")
    seed: int = option(0, "seed")
    out: str = option("out/dln", "folder for the PNGs")

    def __post_init__(self):
        check_choices_of(self)
        for name in ("epochs", "iterations"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, 0)
        check_number("tol", self.tol, 0)
        check_number("eps", self.eps, 0)


def run_experiment(o: DlnConfig) -> str:
    """Run one experiment, write its pictures under o.out; returns the report to print."""
    if o.experiment == "transfer":
        return _transfer(o)
    width, lr, alpha = o.width or 2 * o.rank, o.lr or 0.2, o.alpha or 4.0
    out = Path(o.out)
    chosen = o.problems if o.experiment == "recover" else o.problems[:1]
    problems = {name: dln.make_problem(name, o.d, o.rank, measurements=o.measurements,
                                       observed_fraction=o.observed, noise=o.noise, seed=o.seed)
                for name in chosen}
    if o.experiment == "subspace":
        name, problem = next(iter(problems.items()))
        trace, record = dln.track_subspace(problem, o.depth, o.eps, lr, o.iterations, o.tol,
                                           seed=o.seed)
        path = plots.subspace_figure(record, o.rank, out / "subspace.png",
                                     f"wide DLN updates, {name}, d={o.d}, r={o.rank}")
        return (f"{name}: error {trace.final_error:.2e} after {trace.iterations[-1]} iterations; "
                f"rank of each layer's update (singular values > 1e-3 x largest): "
                f"{record.effective_rank()[-1]} (2r = {2 * o.rank}, d = {o.d}); largest "
                f"principal angle to the target's subspaces: first layer "
                f"{record.angle_right[-1]:.2f} deg, last layer {record.angle_left[-1]:.2f} deg "
                f"-> {path}")
    rows, runs = [], {}
    for name, problem in problems.items():
        wide, compressed = dln.run_pair(problem, o.depth, width, o.eps, lr, alpha,
                                        o.iterations, o.tol, seed=o.seed)
        rows += [(name, wide), (name, compressed)]
        runs[name] = [wide, compressed]
        worse = dln.dominated_records(wide, compressed)
        if worse:
            log.warning("%s: the C-DLN's error is above the DLN's at %d logged iterations "
                        "(first at %d)", name, len(worse), worse[0][0])
    path = plots.recovery_curves(runs, out / "curves.png",
                                 f"d={o.d}, r={o.rank}, L={o.depth}, r_hat={width}, "
                                 f"eps={o.eps}, lr={lr}, alpha={alpha}")
    return f"{dln.table(rows, o.tol)}\n-> {path}"


def _transfer(o: DlnConfig) -> str:
    data = load_images(o.data, seed=o.seed)
    original, compressed = run_transfer(data, o.model, width=o.width or 64, epochs=o.epochs,
                                        warmup_steps=o.warmup_steps, alpha=o.alpha or 2.0,
                                        lr=o.lr or 1e-3, depth=o.depth, seed=o.seed)
    lines = [f"{o.model} on {o.data} ({len(data.y_train)} train / {len(data.y_test)} test images)",
             f"{'network':22s} {'test acc':>8s} {'params':>9s} {'wide-layer params':>17s} "
             f"{'s/epoch':>8s} {'train s':>8s}"]
    lines += [f"{r.network:22s} {r.accuracy:8.4f} {r.params:9d} {r.wide_params:17d} "
              f"{r.seconds_per_epoch:8.3f} {r.train_seconds:8.1f}" for r in (original, compressed)]
    return "\n".join(lines)
