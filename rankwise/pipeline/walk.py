"""The block walk: a causal LM's calibration statistics one block at a time, each block's
handed over as soon as it is complete.

  forward   the first block's inputs are caught once (everything outside the blocks:
            embeddings, rotary tables, final norm, head, is on the device for the walk);
            block k visits the device, runs every batch, and its outputs become block
            k+1's inputs (kept on the device: one boundary at a time). With gradients,
            each block's inputs are parked on disk (rankwise.pipeline.spill) for the way
            back; without, the block's statistics are complete here and handed over.
  top       the last hidden states go through the model's own head (the blocks stubbed
            out); labels sampled from the model give the gradient with respect to them.
  backward  blocks in reverse: block k visits the device, is recomputed from its parked
            inputs and back-propagated from the gradient coming down from block k+1 with
            the statistics hooks attached; the gradient at its input goes down, and its
            statistics are handed over. The walk stops at the lowest block it measures.

Handing over is a generator's yield of a block's statistics (its targeted layers' and,
when asked, the covariance of the gradient at the block's output: the Fisher of its output,
which block refinement weighs errors with) while the block is still there: the caller
decomposes, may cut the block at once, and drops the statistics before asking for the
next. What the walk holds is one block, one boundary of activations (and of gradients),
one block's statistics: the same at any depth. The statistics equal those of
stats.collect on the whole model (same sampled labels, same sums; a test checks it).

Under torchrun each process walks its share of the batches (batch i on process i mod
world, every label still drawn in order so each batch gets the label it gets in one
process) and the route's Comm sums each block's statistics over the processes before
handing them over (one process: a Comm that does nothing).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RankwiseError
from ..models.blocks import find_blocks, names_by_block
from ..models.host import release_host_memory
from ..models.layers import factorable_modules
from ..statistics import hooks as stats
from .distributed import Comm
from .placement import Placement
from .spill import Spill


@dataclass
class Route:
    """How a walk moves data: which device works and where blocks wait (placement), where
    what waits goes (spill), how processes share the batches (comm)."""
    placement: Placement
    spill: Spill
    comm: Comm
    progress: bool = True

    def mine(self, batches: int) -> list[int]:
        """The indices of this process's batches (batch i on process i mod world)."""
        rank, size = self.comm.shard
        if batches < size:
            raise RankwiseError(f"{batches} calibration batches cannot be shared by {size} "
                                "processes; use more windows or fewer processes")
        return [i for i in range(batches) if i % size == rank]


@dataclass(frozen=True)
class Wants:
    """What a statistics walk collects: input-side covariances, the gradient side (None,
    "diag" or "full"; labels sampled with `seed`), each block's output Fisher, both sides
    of every layer whichever is smaller (`both_sides`: C and G, what pricing a rounded
    weight needs), and what rounding reads (`weighted_inputs`: each layer's inputs weighted
    by its squared output gradient; `token_weights`: those weights themselves), and whether
    every other window is held out (`held_out`: their sums kept apart as well, for pricing
    what is fitted on the rest; the odd windows in calibration order, so each source of a
    mixture gives both sides; none with a single window)."""
    inputs: bool = True
    gradients: str | None = None
    output_fisher: bool = False
    seed: int = 0
    both_sides: bool = False
    weighted_inputs: bool = False
    token_weights: bool = False
    held_out: bool = False

    def held(self, batches: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Per batch, the mask of its windows held out (None: nothing held out)."""
        starts = [0]
        for batch in batches:
            starts.append(starts[-1] + len(batch))
        if not self.held_out or starts[-1] < 2:
            return [None] * len(batches)
        return [(torch.arange(start, start + len(batch)) % 2 == 1)
                for start, batch in zip(starts, batches)]

    @property
    def backward(self) -> bool:
        """Whether the walk goes back down the blocks (anything from gradients)."""
        return bool(self.gradients or self.weighted_inputs or self.token_weights)


@dataclass
class BlockStatistics:
    """One block's statistics on the device, as the walk hands them over."""
    index: int                                    # the block's position
    names: list[str]                              # its targeted layers
    layers: dict[str, stats.LayerStats]
    output_fisher: torch.Tensor | None = None     # sum g g^T of the gradient at its output


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
        raise RankwiseError("the model never called its first block; the block walk needs "
                            "a model that runs its blocks in order")
    if not all(args and torch.is_tensor(args[0]) for args, _ in caught):
        raise RankwiseError("the block walk needs blocks called with the hidden states as "
                            "their first positional argument")
    return caught


def run_block(block: nn.Module, hidden: torch.Tensor, rest: tuple[tuple, dict]
              ) -> tuple[torch.Tensor, bool]:
    """(the block's output hidden states, whether the block returns a tuple)."""
    args, kwargs = rest
    out = block(hidden, *args, **kwargs)
    return (out[0], True) if isinstance(out, (tuple, list)) else (out, False)


class _Stub(nn.Module):
    """Stands in for a block at the top: the first returns the hidden states it is given,
    the others pass theirs through, in the form the real blocks return."""

    def __init__(self, first: bool, as_tuple: bool):
        super().__init__()
        self.first, self.as_tuple, self.value = first, as_tuple, None

    def forward(self, hidden, *args, **kwargs):
        out = self.value if self.first else hidden
        return (out,) if self.as_tuple else out


def _top_gradients(model, blocks, batches, mine, last_hidden, as_tuple, placement, seed):
    """d(sampled-label loss)/d(last hidden states) for this process's batches, through the
    model's own head, one window at a time (the logits and their gradient are the largest
    tensors of the walk); every batch's labels are drawn, in order."""
    generator = torch.Generator().manual_seed(seed)
    real = list(blocks)
    stubs = [_Stub(i == 0, as_tuple) for i in range(len(blocks))]
    grads, hidden = [], iter(last_hidden)
    try:
        for i, stub in enumerate(stubs):
            blocks[i] = stub
        for i, ids in enumerate(batches):
            if i not in mine:
                torch.rand(ids.numel(), 1, generator=generator)    # that batch's labels
                continue
            h = next(hidden)
            grad = torch.empty_like(h)
            for w in range(h.shape[0]):
                part = h[w:w + 1].detach().requires_grad_(True)
                stubs[0].value = part
                with torch.enable_grad():
                    logits = model(input_ids=placement.to_device(ids[w:w + 1]),
                                   use_cache=False).logits
                    logits.backward(stats.sample_logit_gradient(logits, generator))
                grad[w:w + 1] = part.grad
                del logits
            grads.append(grad)
    finally:
        for i, block in enumerate(real):
            blocks[i] = block
    return grads


class _Groups:
    """Which layers of a block read the same input, found once on the first block visited
    (the blocks are one class) and applied to every block by relative name."""

    def __init__(self):
        self.relative: dict[str, str] | None = None

    def leader(self, block: nn.Module, block_name: str, owned: list[str], call) -> dict[str, str]:
        if self.relative is None:
            every = factorable_modules(block)
            self.relative = stats.shared_inputs(block, every, call)
        rel = {name: name[len(block_name) + 1:] for name in owned}
        first = {}                                   # relative leader -> first owned member
        for name, r in rel.items():
            first.setdefault(self.relative.get(r, r), name)
        return {name: first[self.relative.get(r, r)] for name, r in rel.items()}


def walk(model: nn.Module, layers, batches: list[torch.Tensor], route: Route,
         wants: Wants) -> Iterator[BlockStatistics]:
    """Yield the statistics of every block holding targeted `layers` (their names; the
    modules are looked up when their block is visited, so a layer the caller has replaced
    is not kept alive) (see the module docstring)."""
    prefix, blocks = find_blocks(model)
    owned = names_by_block(model, layers)
    targeted = [k for k in range(len(blocks)) if owned[k]]
    if not targeted:
        return
    placement, spill, comm = route.placement, route.spill, route.comm
    mine = route.mine(len(batches))
    tokens = sum(b.numel() for b in batches)
    held = wants.held(batches)
    held_tokens = sum(b[rows].numel() for b, rows in zip(batches, held) if rows is not None)
    backward = wants.backward
    lowest, highest = targeted[0], targeted[-1]
    last = len(blocks) - 1 if backward else highest
    groups = _Groups()

    def accumulator(k, block, hidden, rest, on_the_way_back: bool):
        name = f"{prefix}.{k}" if prefix else str(k)
        leader = groups.leader(block, name, owned[k], lambda: run_block(block, hidden, rest))
        return stats.Accumulator({n: model.get_submodule(n) for n in owned[k]}, leader,
                                 wants.inputs, wants.gradients if on_the_way_back else None,
                                 wants.both_sides, on_the_way_back and wants.weighted_inputs,
                                 on_the_way_back and wants.token_weights)

    def handed_over(k, acc, fisher=None):
        if held_tokens:
            acc.pair_up()
        comm.all_reduce(acc.sums.totals)
        output_fisher = None
        if fisher is not None:
            comm.all_reduce(fisher.totals)
            output_fisher = fisher.pop()["output_fisher"]
        return BlockStatistics(k, list(owned[k]), acc.result(tokens, held_tokens), output_fisher)

    was_training = model.training
    model.eval()
    with stats.activation_gradients_only(model):
        try:
            with placement.outside(model, blocks):
                calls = block_inputs(model, [placement.to_device(batches[i]) for i in mine])
                rest = [(args[1:], kwargs) for args, kwargs in calls]
                hidden = [args[0] for args, _ in calls]
                del calls
                as_tuple = False
                for k in tqdm(range(last + 1), desc="statistics, forward", unit="block",
                              disable=not route.progress):
                    block = placement.onload(blocks[k])
                    try:
                        if backward and k >= lowest:
                            spill.put(f"inputs{k}", {str(j): h for j, h in enumerate(hidden)})
                        acc = accumulator(k, block, hidden[0], rest[0], False) \
                            if owned[k] and not backward else None
                        outs = []
                        with torch.no_grad(), (acc.attached() if acc else contextlib.nullcontext()):
                            for j, (h, r) in enumerate(zip(hidden, rest)):
                                if acc:
                                    acc.held = held[mine[j]]
                                out, as_tuple = run_block(block, h, r)
                                outs.append(out)
                        if acc:
                            yield handed_over(k, acc)
                    finally:
                        placement.offload(block)
                    hidden = outs
                if not backward:
                    return
                grads = _top_gradients(model, blocks, batches, mine, hidden, as_tuple,
                                       placement, wants.seed)
                del hidden
            for k in tqdm(range(last, lowest - 1, -1), desc="statistics, backward",
                          unit="block", disable=not route.progress):
                block = placement.onload(blocks[k])
                try:
                    parked = spill.take(f"inputs{k}")
                    stored = [placement.to_device(parked[str(j)]) for j in range(len(rest))]
                    del parked
                    acc = accumulator(k, block, stored[0], rest[0], True) if owned[k] else None
                    fisher = stats.Sums() if acc and wants.output_fisher else None
                    below = []
                    with torch.enable_grad(), (acc.attached() if acc else contextlib.nullcontext()):
                        for j, (r, g) in enumerate(zip(rest, grads)):
                            if acc:
                                acc.held = held[mine[j]]
                            if fisher is not None:
                                fisher.gram("output_fisher", g)
                            h = stored[j].requires_grad_(True)
                            out, _ = run_block(block, h, r)
                            out.backward(g)
                            below.append(h.grad if k > lowest else None)
                            stored[j] = grads[j] = None
                    grads = below
                    if acc:
                        yield handed_over(k, acc, fisher)
                finally:
                    placement.offload(block)
                release_host_memory(collect=False)   # or the freed activations pile up
        finally:
            model.train(was_training)
            release_host_memory()
