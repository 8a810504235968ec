"""LowRankLinear (a linear map stored as two thin factors, y = B (A x) + bias), the
parameter count of a layer at any rank, and swapping modules in a model."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .errors import RankwiseError


def dense_params(out_features: int, in_features: int) -> int:
    return out_features * in_features


def factored_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factors are strictly smaller than the dense weight."""
    return (out_features * in_features - 1) // (out_features + in_features)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils): a linear map stored transposed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_factorable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LowRankLinear)) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear, a Conv1D or a LowRankLinear."""
    if is_conv1d(module):
        return module.nf, module.nx
    return module.out_features, module.in_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's m x n weight, y = W x + b; for a Conv1D a transposed view of its
    parameter (writing into it writes the parameter)."""
    return module.weight.T if is_conv1d(module) else module.weight


def held_by(module: nn.Module) -> torch.Tensor:
    """The tensor holding a linear layer's parameters, whose dtype and device are the
    layer's: A for a LowRankLinear, the weight otherwise."""
    return module.A if isinstance(module, LowRankLinear) else module.weight


def params_at(shape: tuple[int, int], rank: int | None) -> int:
    """Parameters of an m x n layer at `rank`; None, or a rank that saves nothing, is dense."""
    m, n = shape
    if rank is None or rank > max_useful_rank(m, n):
        return dense_params(m, n)
    return factored_params(m, n, rank)


class LowRankLinear(nn.Module):
    """Drop-in replacement for nn.Linear with weight B @ A of rank `rank`.

    Forward runs two thin matmuls; the dense weight is never rebuilt, which is where the
    speed-up comes from.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise RankwiseError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, A: torch.Tensor, B: torch.Tensor) -> "LowRankLinear":
        """Factors in place of an nn.Linear, a Conv1D or a LowRankLinear (bias kept)."""
        rank, (m, n) = A.shape[0], linear_shape(linear)
        if A.shape != (rank, n) or B.shape != (m, rank):
            raise RankwiseError(f"factors {tuple(B.shape)} @ {tuple(A.shape)} do not match "
                             f"a linear map {m} x {n}")
        like = held_by(linear)
        layer = cls(n, m, rank, linear.bias is not None, device=like.device, dtype=like.dtype)
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


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def ranks_of(model: nn.Module, names=None) -> dict[str, int | None]:
    """The rank of every LowRankLinear (names=None), or of the named layers with None for
    those still dense."""
    if names is None:
        return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    layers = {n: model.get_submodule(n) for n in names}
    return {n: m.rank if isinstance(m, LowRankLinear) else None for n, m in layers.items()}
