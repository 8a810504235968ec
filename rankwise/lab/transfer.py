"""Carrying the C-DLN to nonlinear nets: wide layers become narrow deep linear blocks.

After a short warm-up of the wide model (its early updates already point into the
low-dimensional subspace training will use), every wide layer W is replaced by a
`DeepLowRankLinear` B M_1 ... M_k A of width r_hat, initialised spectrally from W's top
singular directions (A = S^1/2 V^T, B = U S^1/2, M = I: the block starts at W's best
rank-r_hat approximation), and training continues with the outer factors A, B on a
faster timescale (learning rate alpha times the rest), as in the C-DLN.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import RankwiseError
from ..models.layers import set_module
from .vision import History, ImageData, build_model, fit


class DeepLowRankLinear(nn.Module):
    """A linear map stored as a chain of thin factors, y = B M_k ... M_1 A x + bias: the
    compressed deep linear block (C-DLN) that replaces a wide layer of a nonlinear net.
    `first` (A, rank x in), `middle` (rank x rank each) and `last` (B, out x rank) are kept
    apart so the outer factors can learn on their own timescale."""

    def __init__(self, A: torch.Tensor, middle: list[torch.Tensor], B: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        rank = A.shape[0]
        if B.shape[1] != rank or any(M.shape != (rank, rank) for M in middle):
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, middle "
                             f"{[tuple(M.shape) for M in middle]}, B {tuple(B.shape)}")
        self.in_features, self.out_features, self.rank = A.shape[1], B.shape[0], rank
        self.first = nn.Parameter(A.clone())
        self.middle = nn.ParameterList(nn.Parameter(M.clone()) for M in middle)
        self.last = nn.Parameter(B.clone())
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.first)
        for M in self.middle:
            x = F.linear(x, M)
        return F.linear(x, self.last, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        W = self.first
        for M in self.middle:
            W = M @ W
        return self.last @ W

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, depth={len(self.middle) + 2}")


# the wide layers of each model: an MLP's hidden layers, a ViT's MLP layers
WIDE_LAYERS = {"mlp": r"^hidden\.\d+$", "vit": r"\.fc[12]$"}


def wide_layers(model: nn.Module, pattern: str) -> dict[str, nn.Linear]:
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and re.search(pattern, name)}
    if not found:
        raise RankwiseError(f"no linear layer of the model matches {pattern!r}")
    return found


def spectral_block(linear: nn.Linear, width: int, depth: int = 3) -> DeepLowRankLinear:
    """A depth-`depth` block of width `width` equal to the layer's best rank-`width`
    approximation: A = S^1/2 V^T, middle identities, B = U S^1/2."""
    m, n = linear.weight.shape
    if not 1 <= width <= min(m, n):
        raise RankwiseError(f"width must be in [1, {min(m, n)}] for a {m} x {n} layer, got {width}")
    if depth < 2:
        raise RankwiseError(f"a deep linear block needs at least 2 factors, got {depth}")
    W = linear.weight.detach().to(torch.float64)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = S[:width].sqrt()
    dtype = linear.weight.dtype
    A = (root[:, None] * Vh[:width]).to(dtype)
    B = (U[:, :width] * root).to(dtype)
    middle = [torch.eye(width, dtype=dtype) for _ in range(depth - 2)]
    bias = linear.bias.detach() if linear.bias is not None else None
    return DeepLowRankLinear(A, middle, B, bias)


def compress_wide_(model: nn.Module, pattern: str, width: int, depth: int = 3) -> dict[str, tuple[int, int]]:
    """Replace every matching linear layer in place; returns {name: (dense, compressed)}
    parameter counts of the replaced weights."""
    counts = {}
    for name, linear in wide_layers(model, pattern).items():
        block = spectral_block(linear, width, depth)
        counts[name] = (linear.weight.numel(),
                        sum(p.numel() for p in (block.first, block.last, *block.middle)))
        set_module(model, name, block)
    return counts


def two_timescale_groups(model: nn.Module, lr: float, alpha: float) -> list[dict]:
    """Optimizer parameter groups: the outer factors of every block at alpha * lr."""
    outer = {id(p) for m in model.modules() if isinstance(m, DeepLowRankLinear)
             for p in (m.first, m.last)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) in outer], "lr": alpha * lr},
            {"params": [p for p in params if id(p) not in outer], "lr": lr}]


@dataclass
class TransferResult:
    network: str
    accuracy: float
    params: int                     # whole model
    wide_params: int                # weights of the wide (or replacing) layers
    seconds_per_epoch: float        # median training seconds per epoch
    train_seconds: float            # all training, warm-up included
    history: History


def run_transfer(data: ImageData, kind: str = "mlp", width: int = 64, epochs: int = 20,
                 warmup_steps: int = 20, alpha: float = 2.0, lr: float = 1e-3, depth: int = 3,
                 batch_size: int = 128, seed: int = 0, model_kw: dict | None = None
                 ) -> tuple[TransferResult, TransferResult]:
    """Train the wide model and its compressed version from the same initialisation, for
    the same number of epochs (Adam), and report both."""
    pattern = WIDE_LAYERS[kind]
    model_kw = model_kw or {}

    wide = build_model(kind, data, seed=seed, **model_kw)
    wide_params = sum(l.weight.numel() for l in wide_layers(wide, pattern).values())
    t0 = time.perf_counter()
    history = fit(wide, data, epochs, torch.optim.Adam(wide.parameters(), lr=lr), batch_size, seed)
    original = TransferResult("original", history.test_accuracy[-1], _count(wide), wide_params,
                              history.seconds_per_epoch, time.perf_counter() - t0, history)

    model = build_model(kind, data, seed=seed, **model_kw)
    t0 = time.perf_counter()
    if warmup_steps > 0:
        fit(model, data, 1, torch.optim.Adam(model.parameters(), lr=lr), batch_size, seed,
            max_steps=warmup_steps)
    counts = compress_wide_(model, pattern, width, depth)
    optimizer = torch.optim.Adam(two_timescale_groups(model, lr, alpha))
    history = fit(model, data, epochs, optimizer, batch_size, seed)
    compressed = TransferResult(f"compressed (width {width})", history.test_accuracy[-1],
                                _count(model), sum(c for _, c in counts.values()),
                                history.seconds_per_epoch, time.perf_counter() - t0, history)
    return original, compressed


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
