"""Statistics with memory bounded by one block: the model stays on the CPU, the blocks visit
the device one at a time, and the activations between blocks wait on the CPU.

  forward   the first block's inputs are caught once (everything outside the blocks,
            embeddings, rotary tables, final norm, head, lives on the device); block k is
            onloaded, run on every batch, its outputs kept on the CPU as block k+1's
            inputs, and offloaded;
  top       the last hidden states go through the model's own head (the blocks stubbed
            out) to the logits; labels sampled from the model give the gradient with
            respect to the last hidden states;
  backward  blocks in reverse: block k is onloaded, recomputed from its stored inputs and
            back-propagated from the gradient coming down from block k+1, with the
            statistics hooks of its layers attached; the gradient at its input goes down.

The statistics equal those of stats.collect on the whole model (same labels, same sums),
so everything downstream is unchanged. Peak device memory: one block, one batch's
activations through it, and that block's statistics.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import stats
from ..models import find_blocks
from .sequential import block_inputs

_STAT_KINDS = ("input_cov", "output_cov", "grad_cov", "input_grad_cov", "grad_diag")


@contextlib.contextmanager
def _outside_blocks_on(model: nn.Module, prefix: str, device: torch.device):
    """Every parameter and buffer outside the blocks on `device` for the duration."""
    moved = [t for name, t in [*model.named_parameters(), *model.named_buffers()]
             if not name.startswith(prefix + ".")]
    for t in moved:
        t.data = t.data.to(device)
    try:
        yield
    finally:
        for t in moved:
            t.data = t.data.to("cpu")


class _Stub(nn.Module):
    """Stands in for a block: the first returns the hidden states it is given, the others
    pass theirs through, in the form the real blocks return."""

    def __init__(self, first: bool, as_tuple: bool):
        super().__init__()
        self.first, self.as_tuple, self.value = first, as_tuple, None

    def forward(self, hidden, *args, **kwargs):
        out = self.value if self.first else hidden
        return (out,) if self.as_tuple else out


def _call(block: nn.Module, hidden: torch.Tensor, rest: tuple) -> tuple[torch.Tensor, bool]:
    args, kwargs = rest
    out = block(hidden, *args, **kwargs)
    return (out[0], True) if isinstance(out, (tuple, list)) else (out, False)


def _on(block: nn.Module, device) -> nn.Module:
    block.to(device)
    for p in block.parameters():
        p.requires_grad_(False)
    return block


def collect(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor],
            device: str | torch.device, inputs: bool = True, gradients: str | None = None,
            seed: int = 0, progress: bool = True) -> dict[str, stats.LayerStats]:
    """stats.collect's statistics for a causal LM on token windows, one block on the
    device at a time (the model's parameters stay on the CPU)."""
    device = torch.device(device)
    prefix, blocks = find_blocks(model)
    owned = {k: {n: l for n, l in layers.items()
                 if n.startswith(f"{prefix}.{k}." if prefix else f"{k}.")}
             for k in range(len(blocks))}
    tokens = sum(b.numel() for b in batches)
    result: dict[str, stats.LayerStats] = {}
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with _outside_blocks_on(model, prefix, device):
            calls = block_inputs(model, [b.to(device) for b in batches])
            rest = [(args[1:], kwargs) for args, kwargs in calls]
            hidden = [args[0].cpu() for args, _ in calls]
            del calls
            stored, as_tuple = [], False
            for k in tqdm(range(len(blocks)), desc="onloaded forward", unit="block",
                          disable=not progress):
                block = _on(blocks[k], device)
                acc = _accumulator(block, owned[k], inputs, None, hidden[0], rest[0], device) \
                    if owned[k] and not gradients else None
                outs = []
                with torch.no_grad(), (acc.attached() if acc else contextlib.nullcontext()):
                    for h, r in zip(hidden, rest):
                        out, as_tuple = _call(block, h.to(device), r)
                        outs.append(out.cpu())
                if acc:
                    result.update(_to_cpu(acc.result(tokens)))
                block.to("cpu")
                if gradients:
                    stored.append(hidden)
                hidden = outs
            if not gradients:
                return result
            grads = _top_gradients(model, blocks, batches, hidden, as_tuple, device, seed)
        for k in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="onloaded backward",
                      unit="block", disable=not progress):
            block = _on(blocks[k], device)
            acc = _accumulator(block, owned[k], inputs, gradients, stored[k][0], rest[0], device) \
                if owned[k] else None
            below = []
            with torch.enable_grad(), (acc.attached() if acc else contextlib.nullcontext()):
                for h, r, g in zip(stored[k], rest, grads):
                    h = h.to(device).requires_grad_(True)
                    out, _ = _call(block, h, r)
                    out.backward(g.to(device))
                    below.append(h.grad.cpu())
            if acc:
                result.update(_to_cpu(acc.result(tokens)))
            block.to("cpu")
            grads, stored[k] = below, None
        return result
    finally:
        model.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)


def _accumulator(block, layers, inputs, gradients, hidden0, rest0, device) -> stats.Accumulator:
    """An accumulator for one block's layers, its shared-input groups found on one call."""
    acc = stats.Accumulator(layers, inputs, gradients)
    acc.discover((hidden0.to(device), rest0), block, lambda b, call: _call(b, *call))
    return acc


def _to_cpu(found: dict[str, stats.LayerStats]) -> dict[str, stats.LayerStats]:
    """Move the statistics to the CPU, keeping one object per shared tensor."""
    moved: dict[int, torch.Tensor] = {}
    for s in found.values():
        for kind in _STAT_KINDS:
            t = getattr(s, kind)
            if t is not None:
                setattr(s, kind, moved.setdefault(id(t), t.cpu().to(torch.float64)))
    return found


def _top_gradients(model, blocks, batches, last_hidden, as_tuple, device, seed):
    """d(sampled-label loss)/d(last hidden states) per batch, through the model's head."""
    generator = torch.Generator().manual_seed(seed)
    real = list(blocks)
    stubs = [_Stub(i == 0, as_tuple) for i in range(len(blocks))]
    grads = []
    try:
        for i, stub in enumerate(stubs):
            blocks[i] = stub
        for ids, h in zip(batches, last_hidden):
            h = h.to(device).requires_grad_(True)
            stubs[0].value = h
            with torch.enable_grad():
                logits = model(input_ids=ids.to(device), use_cache=False).logits
                logits.backward(stats.sample_logit_gradient(logits, generator))
            grads.append(h.grad.cpu())
            del logits
    finally:
        for i, block in enumerate(real):
            blocks[i] = block
    return grads
