"""Sequential (block-by-block) statistics: each block is measured on the inputs that the
blocks before it, as they are by then, really produce.

The calibration windows are caught at the first block's input once, then carried through
the blocks one at a time (the GPTQ way: one forward pass in all). `measured_blocks` is a
generator: it yields a block's targeted layers with input-side statistics (C, or W C W^T)
measured on the carried inputs; the caller cuts those layers, and only when the caller asks
for the next block are the inputs carried through the block as cut.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .. import stats
from ..errors import RankwiseError
from ..models import find_blocks

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


def measured_blocks(model: nn.Module, layers: dict[str, nn.Module], batches
                    ) -> Iterator[tuple[list[str], dict[str, stats.LayerStats]]]:
    """For every block holding targeted `layers`, in order: (its layer names, their
    input-side statistics on the inputs the blocks before it produce as they are then)."""
    prefix, blocks = find_blocks(model)
    targets = {index: [name for name in layers
                       if name.startswith(f"{prefix}.{index}." if prefix else f"{index}.")]
               for index in range(len(blocks))}
    last = max((index for index, names in targets.items() if names), default=-1)
    calls = block_inputs(model, list(batches))
    for index, block in enumerate(blocks[:last + 1]):
        names = targets[index]
        if names:
            yield names, stats.collect(block, {n: layers[n] for n in names}, calls,
                                       inputs=True, gradients=None, progress=False,
                                       forward=run_block)
        if index < last:
            calls = advance(block, calls)
