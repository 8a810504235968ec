"""Distillation from the dense teacher: the KL of next-token distributions as a training
objective, with the teacher's log-probabilities computed on the fly or cached as top-k.

A cached teacher keeps, per position, its top-k log-probabilities and their token ids; the
KL is then taken between the two distributions coarsened to those k tokens plus one
bucket for the rest, which is exact for the bucketed distributions and a lower bound on
the full KL (tight when the tail mass is small; with k = 256 on SmolLM2 the bucket holds
a few per cent of the mass).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RankwiseError
from ..statistics import hooks as stats
from .tasks import LanguageTask


def kl_to_teacher(student_logits: torch.Tensor, teacher) -> torch.Tensor:
    """Mean KL(teacher || student) per position. `teacher`: full log-probabilities
    (..., V), or a (log-probabilities, ids) pair of the teacher's top-k."""
    logq = torch.log_softmax(student_logits.float(), -1)
    if torch.is_tensor(teacher):
        return (teacher.exp() * (teacher - logq)).sum(-1).mean()
    logp, ids = teacher[0].float(), teacher[1].long()
    logq_top = logq.gather(-1, ids)
    p_rest = (1 - logp.exp().sum(-1)).clamp_min(0)
    q_rest = (1 - logq_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (logp.exp() * (logp - logq_top)).sum(-1)
    kl = kl + p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log())
    return kl.mean()


class DistillTask(LanguageTask):
    """A LanguageTask whose loss is the KL to the teacher's next-token distributions
    instead of the cross-entropy of the text (so no domain adaptation enters the score).
    topk=None runs the teacher on every batch; topk=k caches its top-k per window of
    `train_ids` windows fixed up front (`windows`, a LongTensor (N, seqlen))."""
    default_lr = 1e-4

    def __init__(self, teacher: nn.Module, windows: torch.Tensor, calibration: torch.Tensor,
                 batch_size: int = 2, steps: int = 200, seed: int = 0, topk: int | None = None,
                 progress: bool = True):
        if windows.dim() != 2 or windows.shape[0] < 1:
            raise RankwiseError("distillation needs at least one training window")
        g = torch.Generator().manual_seed(seed)
        self.order = torch.randint(0, windows.shape[0], (steps, batch_size), generator=g)
        self.windows, self.calibration, self.teacher = windows, calibration, teacher
        self.seqlen = windows.shape[1]
        self.forward = stats.lm_logits
        self.cache = self._cache(topk, progress) if topk else None

    @torch.no_grad()
    def _cache(self, k: int, progress: bool):
        logps, ids = [], []
        device = next(self.teacher.parameters()).device
        for batch in tqdm(self.windows.split(4), desc="teacher top-k", unit="batch",
                          disable=not progress):
            logits = self.teacher(input_ids=batch.to(device), use_cache=False).logits
            top = torch.log_softmax(logits.float(), -1).topk(k, -1)
            logps.append(top.values.half().cpu())
            ids.append(top.indices.int().cpu())
        return torch.cat(logps), torch.cat(ids)

    def batch(self, step: int) -> torch.Tensor:
        return self.order[step]                      # window indices

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        ids = self.windows[batch].to(model.device)
        logits = model(input_ids=ids, use_cache=False).logits
        if self.cache is not None:
            teacher = (self.cache[0][batch].to(model.device), self.cache[1][batch].to(model.device))
        else:
            with torch.no_grad():
                teacher = torch.log_softmax(
                    self.teacher(input_ids=ids, use_cache=False).logits.float(), -1)
        return kl_to_teacher(logits, teacher)
