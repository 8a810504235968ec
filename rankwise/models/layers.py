"""The layers a compression puts in place of a linear map: CompositeLinear (one layer held as
plain nn.Linear parts) and LowRankLinear (two thin factors, y = B (A x) + bias; the other
composite kinds are in rankwise.forms.kinds), sibling fusion of factored layers that read
one input, the parameter count of a layer at any rank, and swapping modules in a model."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import RankwiseError


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
    return isinstance(module, (nn.Linear, CompositeLinear)) or is_conv1d(module)


def factorable_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Every factorable submodule by name (not `module` itself), a CompositeLinear counted
    as one layer: its parts, nn.Linear modules themselves, are parts of it."""
    found, inside = {}, []
    for name, m in module.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in inside):
            continue
        if is_factorable(m):
            found[name] = m
        if isinstance(m, CompositeLinear):
            inside.append(name)
    return found


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear, a Conv1D or a CompositeLinear."""
    if is_conv1d(module):
        return module.nf, module.nx
    return module.out_features, module.in_features


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The layer's m x n weight, y = W x + b; for a Conv1D a transposed view of its
    parameter (writing into it writes the parameter)."""
    return module.weight.T if is_conv1d(module) else module.weight


def held_by(module: nn.Module) -> torch.Tensor:
    """The tensor holding a linear layer's parameters, whose dtype and device are the
    layer's: A's weight for a CompositeLinear, the weight otherwise."""
    return module.A.weight if isinstance(module, CompositeLinear) else module.weight


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


class CompositeLinear(nn.Module):
    """A linear map held as plain nn.Linear parts and counted as one layer: factors `A`
    (in -> rank) and `B` (rank -> out) that refinement and fine-tuning train, and whatever
    else its kind holds (rankwise.forms.kinds). Anything that works on nn.Linear by type or
    by name (torchao's quantize_, llm-compressor and GPTQModel recipes, bitsandbytes, vLLM)
    takes each part as it is, and a state dict holds the parts' own tensors."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise RankwiseError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")
        self._kw = {"device": torch.get_default_device() if device is None else device,
                    "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def part(self, in_features: int, out_features: int, bias: bool) -> nn.Linear:
        """An nn.Linear part left uninitialised (parts are always filled in afterwards, from
        a layer or a state dict), its bias zero."""
        linear = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, **self._kw)
        if bias:
            nn.init.zeros_(linear.bias)
        return linear

    @classmethod
    def from_parts(cls, linear: nn.Module, rank: int | None = None,
                   **weights: torch.Tensor) -> "CompositeLinear":
        """One in place of an nn.Linear, a Conv1D or a composite layer (its bias kept), each
        named part's weight given; the rank is A's rows unless given."""
        rank, (m, n) = rank or weights["A"].shape[0], linear_shape(linear)
        like = held_by(linear)
        layer = cls(n, m, rank, linear.bias is not None, device=like.device, dtype=like.dtype)
        given = {name: tuple(value.shape) for name, value in weights.items()}
        if given != {name: tuple(getattr(layer, name).weight.shape) for name in weights}:
            raise RankwiseError(f"parts {given} do not match a linear map {m} x {n} at rank "
                                f"{rank}")
        with torch.no_grad():
            for name, value in weights.items():
                getattr(layer, name).weight.copy_(value)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def factors(self) -> list[nn.Parameter]:
        """What refinement trains: the A and B weights."""
        return [self.A.weight, self.B.weight]

    def merge(self) -> nn.Linear:
        """The dense map as one plain nn.Linear."""
        return _dense_linear(self.weight, self.bias)


class LowRankLinear(CompositeLinear):
    """Drop-in replacement for nn.Linear with weight B @ A of rank `rank`, made of two plain
    nn.Linear modules: `A` (in_features -> rank, no bias) then `B` (rank -> out_features,
    the original bias); a state dict holds `A.weight`, `B.weight`, `B.bias`.

    Forward runs the two thin matmuls; the dense weight is never rebuilt, which is where the
    speed-up comes from.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, rank, device, dtype)
        self.A = self.part(in_features, rank, False)
        self.B = self.part(rank, out_features, bias)
        self.register_state_dict_post_hook(_own_storage)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.B.bias

    @classmethod
    def from_linear(cls, linear: nn.Module, A: torch.Tensor, B: torch.Tensor) -> "LowRankLinear":
        """Factors in place of an nn.Linear, a Conv1D or a LowRankLinear (bias kept)."""
        return cls.from_parts(linear, A=A, B=B)

    _siblings: "Siblings | None" = None      # set by Siblings: layers reading the same input
    _sibling_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._siblings
        if group is not None and x.numel() >= FUSE_FROM_ROWS * x.shape[-1] and \
                not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            h = group.first_factor(self._sibling_index, x)
            if h is not None:
                return self.B(h)
        return self.B(self.A(x))

    def _apply(self, fn, recurse=True):
        """After a move or cast (`.to`, `.cuda`, `.half`) the group is stacked again at
        once, not at the first eager call, so a CUDA graph captured after the move sees
        the parameters where they stay (the group's last member to move completes it)."""
        module = super()._apply(fn, recurse)
        if self._siblings is not None:
            self._siblings.restack()
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dense product B @ A (for inspection and merging, never used by forward)."""
        return self.B.weight @ self.A.weight

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


@torch.no_grad()
def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear holding a merged map (and the layer's bias)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device=weight.device,
                       dtype=weight.dtype)
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def _plain(weight: torch.Tensor) -> bool:
    """A floating-point weight held as an ordinary tensor (not a quantized subclass)."""
    return type(weight.data) is torch.Tensor and weight.dtype.is_floating_point


class Siblings:
    """Factored layers that read the same input tensor (q/k/v, gate/up): their `A` weights
    are slices of one stacked matrix, so the first factors of the group run as one matmul
    (a wider, better-used kernel and one read of the input instead of several), then each
    layer's own `B`.

    Only without autograd, outside torch.compile (training and compiled graphs take each
    layer's two matmuls as before) and for inputs of at least FUSE_FROM_ROWS rows (a
    prompt, a batch), and only when the layers are called one after another on the very
    same tensor; any other call computes the stacked product afresh. Each `A.weight`
    stays the layer's own parameter (a view of the stack), so training, state dicts and
    saved folders see unfused layers; a move or copy that gives an `A` storage of its own
    is noticed and the stack rebuilt, and factors a quantizer has replaced (a quantized
    tensor or module) are not fused at all."""

    def __init__(self, members: list[LowRankLinear]):
        self.members = list(members)
        self.everyone = (1 << len(self.members)) - 1
        self._forget()
        self.layout: list[tuple[int, int]] = []
        self._stack()
        for i, m in enumerate(self.members):
            m._siblings, m._sibling_index = self, i

    def _forget(self):
        self.x, self.x_version, self.h, self.served = None, None, None, 0

    def restack(self) -> None:
        """Stack the A weights again where they now are (members on different devices or
        dtypes midway through a move: left unstacked until the last one arrives)."""
        self._forget()
        self._stack()

    def _weights(self) -> list[torch.Tensor] | None:
        """Each member's A weight, or None when one is not a plain float tensor of an
        nn.Linear (quantized) or they differ in dtype or device."""
        weights = [getattr(m.A, "weight", None) for m in self.members]
        if not all(type(m.A) is nn.Linear and w is not None and _plain(w)
                   for m, w in zip(self.members, weights)):
            return None
        return weights if len({(w.dtype, w.device) for w in weights}) == 1 else None

    def _stack(self) -> bool:
        """Stack the A weights (False when they cannot be: see _weights)."""
        weights = self._weights()
        if weights is None:
            self.layout = []
            return False
        ends = torch.tensor([w.shape[0] for w in weights]).cumsum(0).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        with torch.no_grad(), torch.inference_mode(False):   # a tensor training may use
            stacked = torch.cat([w.detach() for w in weights])
        for w, (lo, hi) in zip(weights, self.bounds):
            w.data = stacked[lo:hi]
        self.stacked = stacked
        row = stacked.stride(0) * stacked.element_size()
        self.layout = [(stacked.data_ptr() + lo * row, hi - lo) for lo, hi in self.bounds]
        return True

    def _stacked_still(self) -> bool:
        """Every A weight still the slice of the stack it was made (a move, a cast, a copy,
        a new parameter or a quantizer gives it storage of its own)."""
        if not self.layout:
            return False
        for m, (ptr, rows) in zip(self.members, self.layout):
            A = getattr(m.A, "weight", None)
            if A is None or not _plain(A) or A.data_ptr() != ptr or A.shape[0] != rows:
                return False
        return True

    def first_factor(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member i's A x, from the stacked product for this input (computed on the first
        call with it); None when the factors cannot be stacked (the caller runs its own)."""
        version = -1 if x.is_inference() else x._version
        if x is not self.x or version != self.x_version or self.served >> i & 1:
            if not self._stacked_still() and not self._stack():
                return None
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
    """A fused layer's A weight is a slice of its group's stack: a state dict gets its own
    copy (safetensors and save_pretrained refuse tensors that share memory)."""
    key = prefix + "A.weight"
    if module._siblings is not None and key in state_dict:
        state_dict[key] = state_dict[key].clone()


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
