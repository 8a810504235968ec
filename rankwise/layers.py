"""LowRankLinear (a linear map stored as two thin factors, y = B (A x) + bias), sibling
fusion of factored layers that read one input, the parameter count of a layer at any rank,
and swapping modules in a model."""
from __future__ import annotations

import copy

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


# Sibling fusion from this many input rows (tokens x sequences): there the products are
# compute-bound and one wide matmul beats several thin ones; below (decoding a few
# sequences) the work is reading the weights, the same bytes either way, and the fused
# path's bookkeeping costs more than the matmul launches it saves (measured on a CPU:
# README, Speed).
FUSE_FROM_ROWS = 64


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
        self.register_state_dict_post_hook(_own_storage)

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

    _siblings: "Siblings | None" = None      # set by Siblings: layers reading the same input
    _sibling_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._siblings
        if group is not None and x.numel() >= FUSE_FROM_ROWS * x.shape[-1] and \
                not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return F.linear(group.first_factor(self._sibling_index, x), self.B, self.bias)
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


class Siblings:
    """Factored layers that read the same input tensor (q/k/v, gate/up): their `A` factors
    are slices of one stacked matrix, so the first factors of the group run as one matmul
    (a wider, better-used kernel and one read of the input instead of several), then each
    layer's own `B`.

    Only without autograd, outside torch.compile (training and compiled graphs take each
    layer's two matmuls as before) and for inputs of at least FUSE_FROM_ROWS rows (a
    prompt, a batch), and only when the layers are called one after another on the very
    same tensor; any other call computes the stacked product afresh. Each `A`
    stays the layer's own parameter (a view of the stack), so training, state dicts and
    saved folders see unfused layers; a move or copy that gives an `A` storage of its own
    is noticed and the stack rebuilt."""

    def __init__(self, members: list[LowRankLinear]):
        self.members = list(members)
        self.everyone = (1 << len(self.members)) - 1
        self._forget()
        self._stack()
        for i, m in enumerate(self.members):
            m._siblings, m._sibling_index = self, i

    def _forget(self):
        self.x, self.x_version, self.h, self.served = None, None, None, 0

    def _stack(self):
        ends = torch.tensor([m.A.shape[0] for m in self.members]).cumsum(0).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        with torch.no_grad(), torch.inference_mode(False):   # a tensor training may use
            stacked = torch.cat([m.A.detach() for m in self.members])
        for m, (lo, hi) in zip(self.members, self.bounds):
            m.A.data = stacked[lo:hi]
        self.stacked = stacked
        row = stacked.stride(0) * stacked.element_size()
        self.layout = [(stacked.data_ptr() + lo * row, hi - lo) for lo, hi in self.bounds]

    def _stacked_still(self) -> bool:
        """Every A still the slice of the stack it was made (a move, a cast, a copy or a
        new parameter gives it storage of its own)."""
        for m, (ptr, rows) in zip(self.members, self.layout):
            A = m._parameters["A"]
            if A.data_ptr() != ptr or A.shape[0] != rows:
                return False
        return True

    def first_factor(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Member i's A x, from the stacked product for this input (computed on the first
        call with it)."""
        version = -1 if x.is_inference() else x._version
        if x is not self.x or version != self.x_version or self.served >> i & 1:
            if not self._stacked_still():
                self._stack()
            self.x, self.x_version, self.h, self.served = x, version, F.linear(x, self.stacked), 0
        self.served |= 1 << i
        lo, hi = self.bounds[i]
        h = self.h[..., lo:hi]
        if self.served == self.everyone:        # every sibling has its share: hold nothing
            self._forget()
        return h

    def __deepcopy__(self, memo):
        """A copy of the model gets its own group, stacked again on its first fused call
        (a deep copy gives every parameter storage of its own)."""
        twin = Siblings.__new__(Siblings)
        memo[id(self)] = twin
        twin.members = [copy.deepcopy(m, memo) for m in self.members]
        twin.bounds, twin.everyone = self.bounds, self.everyone
        twin.layout = [(0, -1)] * len(self.members)
        twin._forget()
        return twin


def _own_storage(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A fused layer's A is a slice of its group's stack: a state dict gets its own copy
    (safetensors and save_pretrained refuse tensors that share memory)."""
    if module._siblings is not None and prefix + "A" in state_dict:
        state_dict[prefix + "A"] = state_dict[prefix + "A"].clone()


def fused_groups(model: nn.Module) -> list[list[str]]:
    """The installed sibling groups, by layer name."""
    names = {id(m): n for n, m in model.named_modules()}
    seen, groups = set(), []
    for m in model.modules():
        group = getattr(m, "_siblings", None)
        if isinstance(m, LowRankLinear) and group is not None and id(group) not in seen:
            seen.add(id(group))
            groups.append([names[id(x)] for x in group.members])
    return groups


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
