"""Perplexity, divergence from the dense model, and size (speed: rankwise.speed)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .layers import is_conv1d, linear_shape


@dataclass
class Report:
    tokens: int
    perplexity: float
    reference_perplexity: float | None = None
    kl: float | None = None            # mean KL(reference || model) per next-token prediction
    top1_agreement: float | None = None


@torch.inference_mode()
def evaluate(model: nn.Module, windows: torch.Tensor,
             reference: nn.Module | list[torch.Tensor] | None = None,
             batch_size: int = 4, progress: bool = True) -> Report:
    """Perplexity of `model` on token windows (N, L); with a reference (the dense model, or
    its `reference_log_probs` on the same windows and batch size), also its perplexity, the
    KL of next-token distributions and top-1 agreement. The models run one window at a time
    (on a CPU as fast as several, and the vocabulary-wide tensors stay small)."""
    nll = ref_nll = kl = agree = 0.0
    tokens = 0
    bar = tqdm(total=windows.shape[0], desc="evaluating", unit="window", disable=not progress)
    for i, batch in enumerate(windows.split(batch_size)):
        for j, ids in enumerate(batch.split(1)):
            logp = _log_probs(model, ids)
            targets = ids[:, 1:].reshape(-1).to(logp.device)
            nll += F.nll_loss(logp, targets, reduction="sum").item()
            tokens += targets.numel()
            if reference is not None:
                rows = slice(j * targets.numel(), (j + 1) * targets.numel())
                ref_logp = reference[i][rows].to(logp.device).float() \
                    if isinstance(reference, list) else _log_probs(reference, ids).to(logp.device)
                ref_nll += F.nll_loss(ref_logp, targets, reduction="sum").item()
                kl += _kl_sum(ref_logp, logp)
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            bar.update()
    bar.close()
    report = Report(tokens=tokens, perplexity=math.exp(nll / tokens))
    if reference is not None:
        report.reference_perplexity = math.exp(ref_nll / tokens)
        report.kl = kl / tokens
        report.top1_agreement = agree / tokens
    return report


@torch.inference_mode()
def reference_log_probs(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                        progress: bool = True) -> list[torch.Tensor]:
    """The dense model's next-token log-probabilities per batch (float16 to halve memory),
    so several compressed models can be compared with one dense pass."""
    return [_log_probs(model, ids).half().cpu()
            for ids in tqdm(windows.split(batch_size), desc="dense reference", unit="batch",
                            disable=not progress)]


def _kl_sum(ref_logp: torch.Tensor, logp: torch.Tensor, rows: int = 64) -> float:
    """sum over positions of KL(ref || model), a few rows at a time (the elementwise terms of
    a whole window would be three more tensors of the logits' size)."""
    return sum(F.kl_div(q, p, reduction="sum", log_target=True).item()
               for q, p in zip(logp.split(rows), ref_logp.split(rows)))


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (positions x vocabulary), normalised in place: the
    logits of a window are the largest tensor of an evaluation."""
    ids = ids.to(next(model.parameters()).device)
    logits = model(input_ids=ids, use_cache=False).logits.float()
    logits.sub_(logits.logsumexp(-1, keepdim=True))
    return logits[:, :-1].reshape(-1, logits.shape[-1])   # a view for one window


def linear_macs(model: nn.Module) -> int:
    """Multiply-accumulates per token of every linear map (LM head included); a factored
    layer's are those of its two nn.Linear factors."""
    return sum(m * n for m, n in (linear_shape(module) for module in model.modules()
                                  if isinstance(module, nn.Linear) or is_conv1d(module)))


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
