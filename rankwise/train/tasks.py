"""What fine-tuning trains on. A task gives, for step k, a fixed batch (`batch(k)`), its
loss (`loss(model, batch)`), the calibration batches the metric is measured on
(`calibration_batches()`), the model's forward for statistics (`forward(model, batch)`),
and its default learning rate. Image tasks live in rankwise.lab."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import RankwiseError
from ..statistics import hooks as stats


class LanguageTask:
    """Next-token loss on random windows (seeded, fixed per step) of a token stream; the
    calibration windows come from a held-out part of the text."""
    default_lr = 1e-4          # AdamW on a pretrained LLM

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
