"""The two-stream walk: block by block, forward only, the dense model's activations and the
compressed model's side by side, so that each layer can be cut to reproduce the dense
model's outputs from the inputs the already-compressed model really gives it.

For every block holding targeted layers, on the device the placement names:
  targets  the dense reference block runs every batch of the dense stream once: its
           outputs are the targets (and the next block's dense inputs), and the inputs of
           the block's targeted layers on the way are kept, one per group of layers that
           read the same input (q/k/v, o, gate/up, down);
  groups   in the order the block calls them, for each group every batch runs the live
           block on the compressed stream only as far as the group's input (a hook stops
           the forward there), and the sums C = sum x_c x_c^T and X = sum x_c x_d^T of that
           input are handed over (`GroupInputs`). The caller cuts the group's layers before
           asking for the next group, so every later group is measured on a block whose
           earlier groups are already cut.
  block    then the block itself is handed over with its data (`BlockStream`: compressed-
           stream inputs, dense-stream outputs) for the caller to refine;
  onward   the compressed stream goes through the block as the caller left it, the dense
           stream through the reference (its outputs are the targets already computed).
Blocks in between without targeted layers carry both streams through unchanged.

The dense reference of a block is what `reference(k, block)` gives (rankwise.cut.compress
decides: a copy of the block before its cut, or the layers as they were before the first
of several cuts). What the walk holds is one block and its reference, three boundaries of
activations (both streams' inputs and the dense outputs) and one group's sums: the same at
any depth, plus the dense inputs of one block's groups (for a Llama block, 3 x hidden +
intermediate numbers per token, the price of not running the dense block once per group).
Under torchrun each process carries its share of the batches and the sums are all-reduced
before they are handed over.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.blocks import find_blocks, names_by_block
from ..models.host import release_host_memory
from ..models.layers import factorable_modules
from ..statistics import hooks as stats
from .walk import Route, block_inputs, run_block


@dataclass
class GroupInputs:
    """The sums of one input, shared by `names`, over every process's tokens; with token
    weights, per layer given them the covariance with each token weighted by the layer's
    weight, H = sum_t w_t x_t x_t^T (what rounding reads: rankwise.forms.rounding)."""
    names: list[str]
    cov: torch.Tensor        # C = sum x_c x_c^T (compressed stream)
    cross: torch.Tensor      # X = sum x_c x_d^T (compressed against dense)
    tokens: int
    weighted: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BlockStream:
    """A cut block on the device with this process's batches of its calibration data: what
    it reads on the compressed stream and what the dense block gives on the dense one."""
    index: int
    block: nn.Module
    names: list[str]
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    rest: list[tuple[tuple, dict]]
    batches: list[int]           # the global index of each of this process's batches
    total: int                   # batches over every process
    outputs: list[torch.Tensor] | None = None   # the block's outputs, if the caller has them

    def output(self, j: int) -> torch.Tensor:
        """The live block's output on this process's j-th batch."""
        return run_block(self.block, self.inputs[j], self.rest[j])[0]


class _Stop(Exception):
    """Ends a forward pass once a group's input is caught."""


def _caught_input(block: nn.Module, leader: nn.Module, hidden, rest) -> torch.Tensor:
    """The input `leader` receives when `block` runs on `hidden` (the rest of the block is
    not computed)."""
    caught = []

    def catch(module, args):
        caught.append(args[0])
        raise _Stop

    handle = leader.register_forward_pre_hook(catch)
    try:
        run_block(block, hidden, rest)
    except _Stop:
        pass
    finally:
        handle.remove()
    return caught[0]


def _groups_in_call_order(block: nn.Module, block_name: str, names: list[str], call
                          ) -> list[list[str]]:
    """The targeted layers of a block grouped by the very input tensor they read, in the
    order the block first calls each group."""
    relative = {name[len(block_name) + 1:]: name for name in names}
    every = factorable_modules(block)
    leader = stats.shared_inputs(block, every, call)       # insertion order: call order
    groups: dict[str, list[str]] = {}
    for rel in leader:
        if rel in relative:
            groups.setdefault(leader[rel], []).append(relative[rel])
    return list(groups.values())


def walk_streams(model: nn.Module, layers, batches: list[torch.Tensor], route: Route,
                 reference: Callable[[int, nn.Module], nn.Module],
                 weights: Callable[[str], list[torch.Tensor]] | None = None
                 ) -> Iterator[GroupInputs | BlockStream]:
    """Yield each targeted block's groups' sums, then the block itself (see the module
    docstring). `layers`: the targeted names; reference(k, block) -> the dense block k on
    the device; weights(name) -> a layer's token weights, one tensor per batch of this
    process (GroupInputs.weighted), or None where the layer needs none."""
    prefix, blocks = find_blocks(model)
    owned = names_by_block(model, layers)
    targeted = [k for k in range(len(blocks)) if owned[k]]
    if not targeted:
        return
    placement, comm = route.placement, route.comm
    mine = route.mine(len(batches))
    tokens = sum(b.numel() for b in batches)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), placement.outside(model, blocks):
            calls = block_inputs(model, [placement.to_device(batches[i]) for i in mine])
        rest = [(args[1:], kwargs) for args, kwargs in calls]
        dense = [args[0] for args, _ in calls]
        del calls
        compressed = list(dense)
        for k in tqdm(range(targeted[-1] + 1), desc="anchored cut", unit="block",
                      disable=not route.progress):
            block = placement.onload(blocks[k])
            try:
                onward = None
                if not owned[k]:
                    with torch.no_grad():
                        targets = [run_block(block, h, r)[0] for h, r in zip(dense, rest)]
                else:
                    ref = reference(k, block)
                    name = f"{prefix}.{k}" if prefix else str(k)
                    order = _groups_in_call_order(
                        ref, name, owned[k], lambda: run_block(ref, dense[0], rest[0]))
                    leaders = [group[0][len(name) + 1:] for group in order]
                    targets, inputs = _targets(ref, leaders, dense, rest)
                    ref = None                  # the reference copy goes
                    for group, leader, dense_inputs in zip(order, leaders, inputs):
                        weighted = {n: w for n in group if weights and
                                    (w := weights(n)) is not None}
                        yield _measured(group, block.get_submodule(leader), dense_inputs,
                                        compressed, block, rest, comm, tokens, weighted)
                        dense_inputs.clear()
                    stream = BlockStream(k, block, list(owned[k]), compressed, targets, rest,
                                         mine, len(batches))
                    yield stream
                    onward = stream.outputs
                if onward is None:
                    with torch.no_grad():
                        onward = [run_block(block, h, r)[0] for h, r in zip(compressed, rest)]
                compressed, dense = onward, targets
            finally:
                placement.offload(block)
            release_host_memory(collect=False)
    finally:
        model.train(was_training)
        release_host_memory()


def _targets(ref: nn.Module, leaders: list[str], dense, rest
             ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The reference block's outputs on every dense batch, and on the way the inputs of
    each leader (a group's first layer), per leader per batch."""
    inputs: list[list[torch.Tensor]] = [[] for _ in leaders]
    handles = [ref.get_submodule(leader).register_forward_pre_hook(
        lambda module, args, kept=kept: kept.append(args[0]))
        for leader, kept in zip(leaders, inputs)]
    try:
        with torch.no_grad():
            targets = [run_block(ref, h, r)[0] for h, r in zip(dense, rest)]
    finally:
        for handle in handles:
            handle.remove()
    return targets, inputs


def _measured(group: list[str], leader: nn.Module, dense_inputs: list[torch.Tensor],
              compressed, block: nn.Module, rest, comm, tokens: int,
              weights: dict[str, list[torch.Tensor]]) -> GroupInputs:
    """The sums of one group's input over every batch, all-reduced: the live block runs on
    the compressed stream as far as the group's leader."""
    sums = stats.Sums()
    with torch.no_grad():
        for j, (x_d, c, r) in enumerate(zip(dense_inputs, compressed, rest)):
            x_c = _caught_input(block, leader, c, r)
            sums.gram("cov", x_c)
            sums.gram("cross", x_c, x_d)
            for name, w in weights.items():
                sums.gram(("weighted", name), x_c * _token_roots(w[j], x_c))
    comm.all_reduce(sums.totals)
    totals = sums.pop()
    return GroupInputs(list(group), totals["cov"], totals["cross"], tokens,
                       {n: totals[("weighted", n)] for n in weights})


def _token_roots(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sqrt of one batch's token weights, shaped to scale x (..., features) token by token."""
    return w.to(x.device, torch.float32).sqrt().reshape(*x.shape[:-1], 1)


def measure_inputs(stream: BlockStream, layers: dict[str, nn.Module],
                   weights: dict[str, list[torch.Tensor]] | None, comm
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer of `layers` (the block's own), the covariance C = sum_t x_t x_t^T of its
    inputs and, given token weights, H = sum_t w_t x_t x_t^T (what the rounding of its
    factors reads), the block run as it now is on this process's batches of the
    compressed stream, summed over every process."""
    sums = stats.Sums()

    def hook(name):
        def pre(module, args):
            x = args[0]
            sums.gram(("plain", name), x)
            if weights is not None:
                sums.gram(("weighted", name), x * _token_roots(weights[name][j], x))
        return pre

    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            for j in range(len(stream.inputs)):
                stream.output(j)
    finally:
        for handle in handles:
            handle.remove()
    comm.all_reduce(sums.totals)
    totals = sums.pop()
    return {name: {"plain": totals[("plain", name)], "weighted": totals.get(("weighted", name))}
            for name in layers}
