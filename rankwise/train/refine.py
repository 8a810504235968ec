"""Block refinement: once a block's layers are cut, train its factors (and only them) for a
few steps so that the cut block, fed the compressed stream, reproduces what the dense block
gives on the dense stream (rankwise.pipeline.streams hands the block over with both).

The loss is the metric's, one level up from a layer: the error e = block_c(x_c) - y_d at
the block's output, weighted by the Fisher of that output, F = sum g g^T of the gradient at
the block's output with labels sampled from the dense model (the statistics walk collects
it with the layers' own statistics). By the second-order expansion that defines the K-FAC
metric, sum_t e_t^T F e_t is twice the increase of the KL divergence of the model's
outputs that the error causes (tokens taken independently, as K-FAC takes them). Plain
squared error weighs every direction of the residual stream alike, so it spends the
training on the few massive-activation channels the next norm divides away; the Fisher
weighs each direction by what the rest of the network makes of it. Without gradients
(metric whiten) the loss is the plain squared error. The loss is divided by its value
before training, so a learning rate means the same in every block and every model.

Steps go through the one training Runner. Each step's batch is drawn from all calibration
batches by one seeded generator shared by every process; under torchrun the process
holding it computes the gradient and the Runner's all-reduce hands it to the others, so
every process takes the same step and the result is one process's.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from .. import geometry
from ..models.layers import CompositeLinear
from ..pipeline.distributed import Comm
from ..pipeline.streams import BlockStream
from .runner import Runner

log = logging.getLogger(__name__)


def factor_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The factors of every composite layer in the block (low-rank factors, corrections;
    no biases, no norms, no rounded weight)."""
    return [p for m in block.modules() if isinstance(m, CompositeLinear) for p in m.factors()]


class _BlockTask:
    """The refinement as a Runner task: batch(step) is the step's batch (global index);
    loss(block, b) the normalised metric loss on it, computed by the process holding it."""

    def __init__(self, stream: BlockStream, weight: torch.Tensor | None, draws: torch.Tensor,
                 scale: float):
        self.stream, self.weight, self.draws, self.scale = stream, weight, draws, scale
        self.local = {b: j for j, b in enumerate(stream.batches)}

    def batch(self, step: int) -> int:
        return int(self.draws[step])

    def error(self, j: int, output: torch.Tensor) -> torch.Tensor:
        """sum_t e_t^T F e_t on this process's j-th batch."""
        e = (output - self.stream.targets[j]).float()
        if self.weight is not None:
            e = e @ self.weight
        return e.square().sum()

    def loss(self, block: nn.Module, b: int) -> torch.Tensor:
        j = self.local.get(b)
        if j is None:      # another process's batch: it computes the gradient
            return torch.zeros((), requires_grad=True)
        return self.error(j, self.stream.output(j)) / self.scale


@contextlib.contextmanager
def _only_trained(block: nn.Module, params: list[nn.Parameter]):
    """Gradients for `params` alone, the block in evaluation mode (no dropout); the flags
    restored afterwards and the gradients let go (a factor-sized buffer per weight)."""
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None


def _total_error(task: _BlockTask, outputs: list[torch.Tensor], comm: Comm) -> float:
    """The metric loss over every process's batches."""
    total = {"error": torch.tensor(sum(float(task.error(j, out)) for j, out in enumerate(outputs)),
                                   dtype=torch.float64)}
    comm.all_reduce(total)
    return float(total["error"])


def refine_block(stream: BlockStream, output_fisher: torch.Tensor | None, steps: int, lr: float,
                 comm: Comm, seed: int, batches: int) -> tuple[float, float]:
    """Train the cut block's factors `steps` Adam steps at `lr` toward the dense block's
    outputs, on the first `batches` calibration batches; returns the metric loss over all
    batches before and after. Training that ends worse than it began on those batches is
    undone. The block's outputs after training are left in stream.outputs for the walk to
    carry on."""
    block, params = stream.block, factor_parameters(stream.block)
    weight = None
    if output_fisher is not None:      # F = R^T R: e F e^T = |e R^T|^2, any root R will do
        weight = geometry.cholesky_root(output_fisher).half.T.to(stream.inputs[0].device,
                                                                 torch.float32)
    task = _BlockTask(stream, weight, torch.empty(0), 1.0)
    with torch.no_grad():
        before = _total_error(task, [stream.output(j) for j in range(len(stream.inputs))], comm)
    kept = [p.detach().clone() for p in params]
    if params and steps and before > 0:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + stream.index)
        task.draws = torch.randint(0, min(batches, stream.total), (steps,), generator=generator)
        task.scale = before / stream.total          # about 1 per batch at the start
        optimizer = torch.optim.Adam(params, lr=lr)
        runner = Runner(block, task, steps, desc=f"refining block {stream.index}",
                        progress=False, comm=comm)
        with _only_trained(block, params):
            for step in runner.steps(0, lambda done: {}):
                runner.step(step, optimizer)
    with torch.no_grad():
        stream.outputs = [stream.output(j) for j in range(len(stream.inputs))]
        after = _total_error(task, stream.outputs, comm)
        if after > before:      # never worse than the cut: keep the factors it gave
            for p, value in zip(params, kept):
                p.copy_(value)
            stream.outputs, after = None, before
    log.info("block %d refined: metric loss %.4g -> %.4g (%.1f%%)", stream.index, before,
             after, 100 * (after / before - 1) if before else 0.0)
    return before, after
