"""Perplexity, divergence from the dense model, and size (speed: rankwise.evaluation.speed)."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..models.layers import is_conv1d, linear_shape


@dataclass
class Report:
    tokens: int
    perplexity: float
    reference_perplexity: float | None = None
    kl: float | None = None            # mean KL(reference || model) per next-token prediction
    top1_agreement: float | None = None


@torch.inference_mode()
def evaluate(model: nn.Module, windows: torch.Tensor,
             reference: nn.Module | list[torch.Tensor] | HeadInputs | None = None,
             batch_size: int = 4, progress: bool = True) -> Report:
    """Perplexity of `model` on token windows (N, L); with a reference (the dense model, its
    `reference_log_probs` on the same windows and batch size, or its `HeadInputs` on the
    same windows), also its perplexity, the KL of next-token distributions and top-1
    agreement. The model runs `batch_size` windows per forward; each window's
    vocabulary-wide log-probabilities are then formed one at a time."""
    reference_of = _reference_log_probs(reference, batch_size)
    nll = ref_nll = kl = agree = 0.0
    tokens = 0
    bar = tqdm(total=windows.shape[0], desc="evaluating", unit="window", disable=not progress)
    for first, batch in zip(range(0, windows.shape[0], batch_size), windows.split(batch_size)):
        logits = _logits(model, batch)
        for row, ids in enumerate(batch.split(1)):
            logp = _normalised(logits[row:row + 1])
            targets = ids[:, 1:].reshape(-1).to(logp.device)
            nll += F.nll_loss(logp, targets, reduction="sum").item()
            tokens += targets.numel()
            if reference_of is not None:
                ref_logp = reference_of(first + row, ids).to(logp.device).float()
                ref_nll += F.nll_loss(ref_logp, targets, reduction="sum").item()
                kl += _kl_sum(ref_logp, logp)
                agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            bar.update()
        del logits
    bar.close()
    report = Report(tokens=tokens, perplexity=math.exp(nll / tokens))
    if reference_of is not None:
        report.reference_perplexity = math.exp(ref_nll / tokens)
        report.kl = kl / tokens
        report.top1_agreement = agree / tokens
    return report


@dataclass
class HeadInputs:
    """The dense model's inputs to its output head, one (L, d) tensor per window: its
    next-token log-probabilities are the head applied to them, exactly, from 1/85 of the
    numbers (576 against 49,152 a position on the 135M model) and a fraction of the work."""
    head: nn.Module
    inputs: torch.Tensor                     # (windows, L, d)

    def log_probs(self, index: int) -> torch.Tensor:
        weight = self.head.weight
        return _normalised(self.head(self.inputs[index:index + 1].to(weight.device, weight.dtype)))


@contextmanager
def head_inputs_of(model: nn.Module):
    """Collects, while it is open, what `model`'s output head is given, one tensor per call
    (evaluate runs a batch of windows a call), on the host."""
    collected: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: collected.append(args[0].detach().cpu()))
    try:
        yield collected
    finally:
        hook.remove()


@torch.inference_mode()
def head_reproduces(model: nn.Module, ids: torch.Tensor, inputs: torch.Tensor) -> bool:
    """Whether the head applied to a window's captured inputs gives the model's own
    log-probabilities bit for bit: not for a model that changes its logits after the head
    (softcapping, a scale), whose reference must then be run whole."""
    held = HeadInputs(model.get_output_embeddings(), inputs)
    return torch.equal(held.log_probs(0), _log_probs(model, ids[:1]))


def _reference_log_probs(reference, batch_size: int):
    """One way to read the reference's log-probabilities of window `index`, chosen once."""
    if reference is None:
        return None
    if isinstance(reference, HeadInputs):
        return lambda index, ids: reference.log_probs(index)
    if isinstance(reference, list):
        def stored(index, ids):
            positions = ids.shape[1] - 1
            row = index % batch_size
            return reference[index // batch_size][row * positions:(row + 1) * positions]
        return stored
    return lambda index, ids: _log_probs(reference, ids)


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


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits of a batch of windows."""
    return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (positions x vocabulary) of one window."""
    return _normalised(_logits(model, ids))


def _normalised(logits: torch.Tensor) -> torch.Tensor:
    """Logits of one window normalised in place (they are the largest tensor of an
    evaluation), positions that predict a next token only."""
    logits = logits.float()
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
