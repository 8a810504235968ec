"""Sequential cuts: the blocks are cut in order, each projected with the inputs that the
already-compressed blocks before it really produce.

The calibration windows are caught at the first block's input once, then carried through
the blocks one at a time (the GPTQ way: one forward pass in all). Before a block is cut, the
input side of its layers' statistics (C, or W C W^T) is re-measured on the carried inputs;
the gradient side (G, or W^T G W) stays the one from the whole-model pass, because every
block after the one being cut is still dense then.
"""
from __future__ import annotations

import torch
from torch import nn

from . import geometry, stats
from .errors import RankwiseError
from .models import find_blocks

INPUT_SIDE = ("input_cov", "output_cov")


class _Caught(Exception):
    """Stops a forward pass once the first block's inputs are caught."""


def block_inputs(model: nn.Module, batches, forward=stats.lm_logits) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first block's call for every batch: hidden states plus whatever
    the model hands each block (attention mask, position embeddings)."""
    _, blocks = find_blocks(model)
    caught = []

    def catch(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    forward(model, batch)
                except _Caught:
                    pass
    finally:
        handle.remove()
    if len(caught) != len(batches):
        raise RankwiseError("the model never called its first block; sequential mode needs "
                            "a model that runs its blocks in order")
    if not all(args and torch.is_tensor(args[0]) for args, _ in caught):
        raise RankwiseError("sequential mode needs blocks called with the hidden states as "
                            "their first positional argument")
    return caught


def run_block(block: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    """The block's output hidden states for one caught call."""
    args, kwargs = call
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def advance(block: nn.Module, calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The calls of the next block: this block's outputs in place of the hidden states."""
    with torch.no_grad():
        return [((run_block(block, c), *c[0][1:]), c[1]) for c in calls]


def cut_blocks(model: nn.Module, layers: dict[str, nn.Module], cut, layer_stats,
               batches) -> float:
    """Cut every block of `model` in order. `cut(name, matrices, roots)` projects one layer
    with the statistics `matrices` (roots: a geometry.SharedRoots for the block), swaps it
    in and returns the predicted loss of what it dropped. `layer_stats` holds the
    whole-model statistics whose gradient side is kept. Returns the summed predicted loss."""
    prefix, blocks = find_blocks(model)
    targets = {index: [name for name in layers
                       if name.startswith(f"{prefix}.{index}." if prefix else f"{index}.")]
               for index in range(len(blocks))}
    last = max((index for index, names in targets.items() if names), default=-1)
    calls = block_inputs(model, list(batches))
    predicted = 0.0
    for index, block in enumerate(blocks[:last + 1]):
        names = targets[index]
        if names:
            fresh = stats.collect(block, {n: layers[n] for n in names}, calls, inputs=True,
                                  gradients=None, progress=False, forward=run_block)
            roots = geometry.SharedRoots()
            for name in names:
                matrices = layer_stats[name].matrices()
                matrices.update({k: getattr(fresh[name], k) for k in INPUT_SIDE})
                predicted += cut(name, matrices, roots)
        calls = advance(block, calls)
    return predicted
