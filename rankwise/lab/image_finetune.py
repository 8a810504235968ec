"""Fine-tuning under a rank constraint on an image task (`rankwise images`): a dense MLP is
first trained on shipped digit images, then trained down to the budget by rankwise.train."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..evaluation.plots import write_training_outputs
from ..formats.atomic import Output
from ..models.blocks import target_linears
from ..models.host import resolve_device
from ..options import check_choice, check_int, option
from ..train import FinetuneConfig, finetune
from ..train.config import TrainingRun
from .vision import DATASETS, accuracy, build_model, fit, load_images


@dataclass
class ImageRun(TrainingRun):
    """Which images an MLP trains on and where its curves go."""
    task: str = option("digits", "image data set", choices=DATASETS)
    batch_size: int = option(128, "images per step")
    pretrain_epochs: int = option(15, "epochs training the dense MLP first")
    out: str | None = option(None, "output folder: training.png, history.json", required=True)

    def __post_init__(self):
        super().__post_init__()
        check_choice("task", self.task, DATASETS)
        check_int("batch_size", self.batch_size)
        check_int("pretrain_epochs", self.pretrain_epochs, 0)


class ImageTask:
    """Cross-entropy on minibatches (seeded, fixed per step) of an image data set; the
    calibration batches are the first `calibration` training images."""
    default_lr = 1e-3          # Adam on a small MLP, not on a pretrained LLM

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


def finetune_images(run: ImageRun, config: FinetuneConfig, progress: bool = True) -> str:
    """Pretrain the dense MLP, fine-tune it down to the budget, write history.json and
    training.png under run.out; returns the report to print."""
    device = resolve_device(run.device)
    out = Output(run.out, "images")
    data = load_images(run.task, seed=run.seed)
    model = build_model("mlp", data, seed=run.seed)
    fit(model, data, run.pretrain_epochs, torch.optim.Adam(model.parameters(), lr=1e-3),
        seed=run.seed)
    dense_acc = accuracy(model, data.x_test, data.y_test)
    model.to(device)
    task = ImageTask(data, run.batch_size, config.steps, run.seed)
    result = finetune(model, task, config, target_linears(model, config.include, config.exclude),
                      checkpoint=run.checkpoint, checkpoint_every=run.checkpoint_every,
                      resume=run.resume, progress=progress)
    acc = accuracy(model.cpu(), data.x_test, data.y_test)
    with out.writing() as tmp:
        write_training_outputs(result, tmp)
    return (f"test accuracy {acc:.4f} (dense {dense_acc:.4f})\n"
            f"{config.method}: {config.steps} steps, removed {result.achieved_ratio:.4f} of the "
            f"targeted parameters (requested {config.ratio}) in {result.seconds:.0f} s -> {out.path}")
