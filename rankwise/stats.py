"""Calibration statistics fed by hooks: input covariances and output-gradient covariances.

Statistics are unnormalised sums over the calibration tokens (float64 accumulators), so
every layer is measured in the same units: that is what lets one global budget compare
layers. Layers that read the very same input tensor (q/k/v, gate/up) share one input
covariance, accumulated once. Output gradients come from labels *sampled from the model's
own predictive distribution*, so their covariance estimates the true Fisher (the Hessian of
the KL at the dense model), not the empirical one. Nothing here knows about SVD.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

GRADIENT_MODES = (None, "diag", "full")


@dataclass
class LayerStats:
    input_cov: torch.Tensor | None   # n x n, shared (same object) by layers reading one input
    grad_cov: torch.Tensor | None    # m x m ("full") or m ("diag")
    tokens: int


class _Accumulator:
    def __init__(self, layers: dict[str, nn.Linear], inputs: bool, gradients: str | None):
        self.layers, self.inputs, self.gradients = layers, inputs, gradients
        self.leader: dict[str, str] = {}      # layer -> the layer whose input it shares
        self.input_cov: dict[str, torch.Tensor] = {}
        self.grad_cov: dict[str, torch.Tensor] = {}
        self._last: tuple[torch.Tensor, str] | None = None

    def _add(self, store: dict, key: str, value: torch.Tensor) -> None:
        value = value.to(torch.float64)
        if key in store:
            store[key] += value
        else:
            store[key] = value

    def pre_hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.leader:   # first batch: discover who shares an input tensor
                same = self._last is not None and self._last[0] is x
                self.leader[name] = self._last[1] if same else name
            self._last = (x, self.leader[name])
            if self.inputs and self.leader[name] == name:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                self._add(self.input_cov, name, x2.T @ x2)
        return hook

    def forward_hook(self, name: str):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: self._grad(name, g))
        return hook

    def _grad(self, name: str, g: torch.Tensor) -> None:
        g2 = g.detach().reshape(-1, g.shape[-1]).float()
        self._add(self.grad_cov, name, g2.T @ g2 if self.gradients == "full" else g2.square().sum(0))

    @contextlib.contextmanager
    def attached(self):
        handles = []
        for name, layer in self.layers.items():
            handles.append(layer.register_forward_pre_hook(self.pre_hook(name)))
            if self.gradients:
                handles.append(layer.register_forward_hook(self.forward_hook(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._last = None


def sample_logit_gradient(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """d/dlogits of the summed cross-entropy against labels drawn from softmax(logits).

    softmax - onehot(sample); inverse-CDF sampling is an order of magnitude faster than
    torch.distributions.Categorical on a 49k vocabulary.
    """
    flat = logits.detach().float().reshape(-1, logits.shape[-1])
    p = torch.softmax(flat, dim=-1)
    cdf = p.cumsum(dim=-1)
    u = torch.rand(flat.shape[0], 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    labels = torch.searchsorted(cdf, u).clamp_max(flat.shape[1] - 1).squeeze(1)
    del cdf
    p[torch.arange(flat.shape[0]), labels] -= 1
    return p.view_as(logits).to(logits.dtype)


@contextlib.contextmanager
def _activation_gradients_only(model: nn.Module):
    """Backward computes gradients w.r.t. activations but never w.r.t. weights (half the cost)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def collect(model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[torch.Tensor],
            inputs: bool = True, gradients: str | None = None, seed: int = 0,
            progress: bool = True) -> dict[str, LayerStats]:
    """Run the calibration batches through `model` and return per-layer statistics.

    inputs: accumulate input covariances. gradients: None, "diag" (diagonal Fisher) or
    "full" (K-FAC output-gradient covariance; needs one backward pass per batch).
    """
    if gradients not in GRADIENT_MODES:
        raise ValueError(f"gradients must be one of {GRADIENT_MODES}, got {gradients!r}")
    acc = _Accumulator(layers, inputs, gradients)
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    was_training = model.training
    model.eval()
    grad_ctx = _activation_gradients_only(model) if gradients else torch.no_grad()
    batches = list(batches)
    try:
        with grad_ctx, acc.attached():
            for ids in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
                tokens += ids.numel()
                logits = model(input_ids=ids, use_cache=False).logits
                if gradients:
                    logits.backward(sample_logit_gradient(logits, generator))
                del logits
    finally:
        model.train(was_training)
    return {
        name: LayerStats(
            input_cov=acc.input_cov.get(acc.leader.get(name, name)) if inputs else None,
            grad_cov=acc.grad_cov.get(name) if gradients else None,
            tokens=tokens)
        for name in layers
    }
