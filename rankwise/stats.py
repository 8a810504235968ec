"""Calibration statistics fed by hooks: covariances of inputs, outputs and gradients.

Statistics are unnormalised sums over the calibration tokens (float64 accumulators), so
every layer is measured in the same units: that is what lets one global budget compare
layers. Output gradients come from labels *sampled from the model's own predictive
distribution*, so they estimate the true Fisher (the Hessian of the KL at the dense
model), not the empirical one.

Only the smaller side of each layer (min(m, n) wide) is ever accumulated, which is all the
projection needs (see geometry.project):
  m <= n (q, k, v, o, down):  G = sum g g^T, and W C W^T = sum (Wx)(Wx)^T from the outputs
                              unless the input covariance C is at hand anyway;
  m >  n (gate, up):          C = sum x x^T, and W^T G W = sum (W^T g)(W^T g)^T, read from
                              the input gradient autograd computes anyway.
Layers reading the very same input tensor (q/k/v, gate/up) share one C, accumulated once.
Nothing here knows about SVD.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import RankwiseError
from .layers import linear_shape
from .pipeline import distributed

GRADIENT_MODES = (None, "diag", "full")


@dataclass
class LayerStats:
    tokens: int
    input_cov: torch.Tensor | None = None       # n x n, C (one object shared by a group)
    output_cov: torch.Tensor | None = None      # m x m, W C W^T
    grad_cov: torch.Tensor | None = None        # m x m, G
    input_grad_cov: torch.Tensor | None = None  # n x n, W^T G W
    grad_diag: torch.Tensor | None = None       # m, diag(G)

    def matrices(self) -> dict[str, torch.Tensor | None]:
        return {k: getattr(self, k) for k in
                ("input_cov", "output_cov", "grad_cov", "input_grad_cov", "grad_diag")}


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x over all tokens, for x of shape (..., features), in float32 (summed in float64
    by the caller). A BLAS syrk computes half of this, but numpy's BLAS threads contend with
    torch's inside autograd hooks and the whole pass gets slower, so plain matmul it is."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    return x.T @ x


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for a batch of token windows (no KV cache)."""
    return model(input_ids=ids.to(model.device), use_cache=False).logits


class Accumulator:
    """Sums of one set of layers' statistics, fed by hooks; float64 on the CPU, float32 on
    a GPU (the eigendecompositions work in float64 either way)."""

    def __init__(self, layers: dict[str, nn.Linear], inputs: bool, gradients: str | None,
                 both_sides: bool = False):
        self.layers, self.inputs, self.gradients = layers, inputs, gradients
        self.both_sides = both_sides
        self.leader: dict[str, str] = {}      # layer -> first layer reading the same input
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._group_needs_input: dict[str, bool] = {}

    def add(self, kind: str, name: str, value: torch.Tensor) -> None:
        value = value.to(torch.float32 if value.is_cuda else torch.float64)
        key = (kind, name)
        if key in self.sums:
            self.sums[key] += value
        else:
            self.sums[key] = value

    def wide(self, name: str) -> bool:
        m, n = linear_shape(self.layers[name])
        return m > n

    def uses_input_cov(self, name: str) -> bool:
        """Accumulate the shared input covariance for this layer's group, or output
        covariances per layer, whichever is smaller (a wide layer always needs C)."""
        group = [k for k, v in self.leader.items() if v == self.leader[name]]
        n = linear_shape(self.layers[name])[1]
        return self.both_sides or any(self.wide(k) for k in group) or \
            n * n <= sum(linear_shape(self.layers[k])[0] ** 2 for k in group)

    def discover(self, batch: torch.Tensor, model: nn.Module, forward) -> None:
        """One forward pass (no statistics) to find which layers share an input tensor."""
        def hook(name):
            def pre(module, args):
                same = self._last is not None and self._last[0] is args[0]
                self.leader[name] = self._last[1] if same else name
                self._last = (args[0], self.leader[name])
            return pre
        handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in self.layers.items()]
        try:
            with torch.no_grad():
                forward(model, batch[:1] if torch.is_tensor(batch) else batch)
        finally:
            for h in handles:
                h.remove()
            self._last = None
        self._group_needs_input = {n: self.uses_input_cov(n) for n in self.layers}

    def pre_hook(self, name: str):
        leader, input_cov = self.leader[name], self._group_needs_input[name]
        wide = self.wide(name) and not self.both_sides

        def hook(module, args):
            x = args[0]
            if self.inputs and input_cov and leader == name:
                self.add("input_cov", name, gram(x))
            if self.gradients == "full" and wide and x.requires_grad:
                # a private view, so its gradient is this layer's W^T g alone
                x = x.view_as(x)
                x.register_hook(lambda g: self.add("input_grad_cov", name, gram(g)))
                return (x, *args[1:])
        return hook

    def forward_hook(self, name: str):
        wide, input_cov = self.wide(name) and not self.both_sides, self._group_needs_input[name]

        def hook(module, args, out):
            if self.inputs and not input_cov:
                y = out if module.bias is None else out - module.bias
                self.add("output_cov", name, gram(y))
            if self.gradients and out.requires_grad:
                out.register_hook(lambda g: self._output_grad(name, wide, g))
        return hook

    def _output_grad(self, name: str, wide: bool, g: torch.Tensor) -> None:
        g2 = g.detach().reshape(-1, g.shape[-1]).float()
        self.add("grad_diag", name, g2.square().sum(0))
        if self.gradients == "full" and not wide:
            self.add("grad_cov", name, gram(g2))

    @contextlib.contextmanager
    def attached(self):
        handles = []
        for name, layer in self.layers.items():
            handles.append(layer.register_forward_pre_hook(self.pre_hook(name)))
            handles.append(layer.register_forward_hook(self.forward_hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def result(self, tokens: int) -> dict[str, LayerStats]:
        out = {}
        for name in self.layers:
            s = LayerStats(tokens=tokens)
            s.input_cov = self.sums.get(("input_cov", self.leader[name]))
            for kind in ("output_cov", "grad_cov", "input_grad_cov", "grad_diag"):
                setattr(s, kind, self.sums.get((kind, name)))
            out[name] = s
        return out


def sample_logit_gradient(logits: torch.Tensor, generator: torch.Generator,
                          chunk: int = 512) -> torch.Tensor:
    """d/dlogits of the summed cross-entropy against labels drawn from softmax(logits).

    softmax - onehot(sample); inverse-CDF sampling is an order of magnitude faster than
    torch.distributions.Categorical on a 49k vocabulary. Rows go `chunk` at a time, so the
    softmax and its CDF never exist for the whole batch at once (on a 49k vocabulary they
    would be two more copies of the logits); the draws are made up front, so the labels do
    not depend on the chunk size.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    u = torch.rand(flat.shape[0], 1, generator=generator, dtype=torch.float32).to(flat.device)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        rows = slice(start, start + chunk)
        p = torch.softmax(flat[rows].float(), dim=-1)
        cdf = p.cumsum(dim=-1)
        labels = torch.searchsorted(cdf, u[rows] * cdf[:, -1:]).clamp_max(flat.shape[1] - 1)
        p.scatter_add_(1, labels, torch.full_like(labels, -1, dtype=p.dtype))
        out[rows] = p
    return out.view_as(logits).to(logits.dtype)


@contextlib.contextmanager
def _activation_gradients_only(model: nn.Module):
    """Backward computes gradients w.r.t. activations but never w.r.t. weights (half the cost)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    # the first activations need a gradient for backward to reach the hooked layers
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    handle = emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True)) \
        if emb is not None else model.register_forward_pre_hook(
            lambda m, args: (args[0].detach().requires_grad_(True), *args[1:]))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def collect(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[torch.Tensor],
            inputs: bool = True, gradients: str | None = None, seed: int = 0,
            progress: bool = True, both_sides: bool = False,
            forward=lm_logits, sharded: bool = False) -> dict[str, LayerStats]:
    """Run the calibration batches through `model` and return per-layer statistics.

    inputs: accumulate input-side covariances (C or W C W^T). gradients: None, "diag"
    (diagonal Fisher) or "full" (K-FAC gradient covariances; one backward pass per batch).
    both_sides: accumulate C (and G, with full gradients) for every layer, whichever side
    is smaller, as a weight that changes during training needs. forward(model, batch)
    returns the logits (default: a causal LM on token windows); the loss is summed over
    every position's sampled label. sharded: under torch.distributed, this rank measures
    batches rank, rank + world, ... and the sums are all-reduced (token-window batches: a
    skipped batch still draws its labels, so the result equals one process's).
    """
    if gradients not in GRADIENT_MODES:
        raise ValueError(f"gradients must be one of {GRADIENT_MODES}, got {gradients!r}")
    batches = list(batches)
    acc = Accumulator(layers, inputs, gradients, both_sides)
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    rank, size = distributed.world() if sharded else (0, 1)
    if len(batches) < size:
        raise RankwiseError(f"{len(batches)} calibration batches cannot be shared by {size} "
                            "processes; use more windows or fewer processes")
    was_training = model.training
    model.eval()
    try:
        acc.discover(batches[0], model, forward)
        grad_ctx = _activation_gradients_only(model) if gradients else torch.no_grad()
        with grad_ctx, acc.attached():
            for i, ids in enumerate(tqdm(batches, desc="calibration", unit="batch",
                                         disable=not progress or rank > 0)):
                if i % size != rank:
                    if gradients:     # the labels this batch gets in one process
                        torch.rand(ids.numel(), 1, generator=generator)
                    continue
                logits = forward(model, ids)
                tokens += logits[..., 0].numel()
                if gradients:
                    logits.backward(sample_logit_gradient(logits, generator))
                del logits
    finally:
        model.train(was_training)
    return acc.result(distributed.all_reduce_sums(acc.sums, tokens) if size > 1 else tokens)
