"""LowRankLinear: a linear map stored as two thin factors, y = B (A x) + bias."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def dense_params(out_features: int, in_features: int) -> int:
    return out_features * in_features


def factored_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factors are strictly smaller than the dense weight."""
    return (out_features * in_features - 1) // (out_features + in_features)


class LowRankLinear(nn.Module):
    """Drop-in replacement for nn.Linear with weight B @ A of rank `rank`.

    Forward runs two thin matmuls; the dense weight is never rebuilt, which is where the
    speed-up comes from.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: "nn.Linear | LowRankLinear", A: torch.Tensor,
                    B: torch.Tensor) -> "LowRankLinear":
        rank = A.shape[0]
        if A.shape != (rank, linear.in_features) or B.shape != (linear.out_features, rank):
            raise ValueError(f"factors {tuple(B.shape)} @ {tuple(A.shape)} do not match "
                             f"a linear map {linear.out_features} x {linear.in_features}")
        like = linear.A if isinstance(linear, LowRankLinear) else linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    device=like.device, dtype=like.dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense product B @ A (for inspection and merging, never used by forward)."""
        return self.B @ self.A

    def merge(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.A.device, dtype=self.A.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.B @ self.A)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


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
