"""Factors in fewer bits: rankwise's rounding of a factored model's factors, in its metric.

Grid. Symmetric integers as compressed-tensors stores them (rankwise.ct_format): b bits
hold q in [-2^(b-1), 2^(b-1) - 1] and a weight is q * scale. 8 bits: one scale per output
row. 4 bits: one scale per group of `group_size` consecutive inputs (a matrix whose input
width the group size does not divide takes the largest divisor below it). Scales are kept
in the 16-bit dtype the folder stores, so the model in memory is exactly what is saved.

Rounding. A factor W (m x n) fed inputs of covariance H (n x n) changes the layer's output
by (W - Q) x, whose expected square is tr((W - Q) H (W - Q)^T): the same input-side metric
the projection uses. Round-to-nearest ignores H. The error-compensating rounding (GPTQ,
Frantar et al. 2022) rounds one input column at a time and moves the rounding error of
column j onto the columns not yet rounded along H^{-1}'s Cholesky row, which minimises
that trace one column at a time. The inner factor A reads the layer's inputs, covariance
C; the outer factor B reads A's outputs, covariance Â C Âᵀ with Â the already rounded A,
so B also corrects what A's rounding lost. C is measured on the compressed model itself
(its inputs are what the factors will see) in one forward pass over calibration windows.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RankwiseError
from .layers import LowRankLinear

FACTOR_BITS = (8, 4)      # what an output stores; the grids themselves take 2 to 8 bits
ROUNDINGS = {"gptq": "error-compensating, column by column in the input covariance's "
                     "metric (GPTQ)",
             "rtn": "round to nearest (the baseline)"}


@dataclass(frozen=True)
class Grid:
    """b-bit symmetric integers, one scale per row (group_size None) or per group of
    group_size inputs."""
    bits: int
    group_size: int | None

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in range(2, 9):
            raise RankwiseError(f"a grid holds 2 to 8 bits, got {self.bits!r}")

    @staticmethod
    def for_bits(bits: int, group_size: int) -> "Grid":
        """8 bits per output row; fewer bits in groups of group_size inputs."""
        return Grid(bits, None if bits == 8 else group_size)

    def __str__(self) -> str:
        where = "per row" if self.group_size is None else f"in groups of {self.group_size}"
        return f"int{self.bits} {where}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group_for(self, columns: int) -> int:
        """The group width for a matrix with `columns` inputs: the whole row, or the
        largest divisor of columns not above group_size; when that divisor is below a
        quarter of group_size (a rank such as 131), the whole row, since scales for tiny
        groups would cost more bits than the integers they scale."""
        if self.group_size is None:
            return columns
        divisor = max(d for d in range(1, min(self.group_size, columns) + 1) if columns % d == 0)
        return divisor if divisor >= min(columns, max(1, self.group_size // 4)) else columns

    def scale(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-row scale of the columns `w` (m x g) holds, rounded to `dtype`."""
        top = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / self.qmax
        return top.to(dtype).to(w.dtype).clamp_min(torch.finfo(dtype).tiny)

    def round(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """w (m x k) on the grid of per-row `scale` (m)."""
        q = torch.round(w / scale[:, None]).clamp(-self.qmax - 1, self.qmax)
        return q * scale[:, None]


@dataclass
class Rounded:
    """A weight on its grid: `weight` (float, = q * scale), `scale` (rows x groups, one
    group for a per-row grid) and the group width."""
    weight: torch.Tensor
    scale: torch.Tensor
    group: int


def round_to_nearest(W: torch.Tensor, grid: Grid, dtype: torch.dtype) -> Rounded:
    W = W.float()
    g = grid.group_for(W.shape[1])
    blocks = W.unflatten(1, (-1, g))                                  # m x groups x g
    scale = torch.stack([grid.scale(blocks[:, k], dtype) for k in range(blocks.shape[1])], 1)
    rounded = torch.cat([grid.round(blocks[:, k], scale[:, k]) for k in range(blocks.shape[1])], 1)
    return Rounded(rounded, scale, g)


def error_compensated(W: torch.Tensor, H: torch.Tensor, grid: Grid, dtype: torch.dtype,
                      damping: float = 0.01) -> Rounded:
    """GPTQ: W (m x n) rounded column by column; each column's error spread over the later
    columns through the upper Cholesky factor of H^{-1} (H damped by `damping` times its
    mean diagonal), within a block of columns at once and onto the later blocks by one
    product. A per-row scale comes from the whole row; a group's scale from its columns
    as compensation has left them when the group is reached. Inputs that never fire
    (H_jj = 0) are zeroed."""
    W = W.float().clone()
    H = H.double().clone()
    m, n = W.shape
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damping * torch.diagonal(H).mean())
    # H^{-1} = L^{-T} L^{-1} through a triangular solve (cholesky_inverse is many times
    # slower on the CPU), then its upper Cholesky factor
    L_inverse = torch.linalg.solve_triangular(torch.linalg.cholesky(H), torch.eye(n, dtype=H.dtype),
                                              upper=False)
    U = torch.linalg.cholesky(L_inverse.T @ L_inverse, upper=True).float()
    g = grid.group_for(n)
    scale = torch.empty(m, n // g)
    if g == n:
        scale[:, 0] = grid.scale(W, dtype)
    with _one_thread():       # column-sized operations: thread hand-offs cost more than they do
        Q = _compensate_columns(W, U, scale, grid, dtype, g)
    return Rounded(Q, scale, g)


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _compensate_columns(W: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, grid: Grid,
                        dtype: torch.dtype, g: int) -> torch.Tensor:
    """error_compensated's column loop: returns the rounded W (W updated in place, the
    group scales filled in as their groups are reached)."""
    m, n = W.shape
    Q = torch.empty_like(W)
    low, high = -grid.qmax - 1, grid.qmax
    inverse_diagonal = 1 / torch.diagonal(U)
    block = g * max(1, 128 // g) if g < n else 128      # whole groups in a block
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        Wb, Err = W[:, lo:hi].clone(), torch.empty(m, hi - lo)
        for j in range(hi - lo):
            col = lo + j
            if col % g == 0:          # a new group: its scale from its columns now
                if g < n:
                    scale[:, col // g] = grid.scale(Wb[:, j:j + g], dtype)
                step = scale[:, col // g]
            w = Wb[:, j]
            q = torch.div(w, step).round_().clamp_(low, high).mul_(step)
            Q[:, col] = q
            err = Err[:, j]
            torch.sub(w, q, out=err).mul_(inverse_diagonal[col])
            Wb[:, j + 1:].addr_(err, U[col, col + 1:hi], alpha=-1)
        W[:, hi:].addmm_(Err, U[lo:hi, hi:], alpha=-1)
    return Q


def factored_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def input_covariances(model: nn.Module, windows: torch.Tensor, batch_size: int,
                      layers: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """E[x x^T] of the inputs of `layers` (default: every factored layer) over the windows
    (one forward pass; each batch's product in float32, the sums in float64). Layers
    called one after another on the very same tensor (q/k/v, gate/up) share one matrix."""
    layers = factored_layers(model) if layers is None else layers
    sums: dict[str, torch.Tensor] = {}
    last: list = [None, None]          # the latest input tensor and the layer that summed it

    def hook(name):
        def record(module, args):
            x = args[0]
            if x is last[0]:
                sums[name] = sums[last[1]]
                return
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + (flat.T @ flat).double()
            last[:] = [x, name]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for lo in range(0, len(windows), batch_size):
                model(windows[lo:lo + batch_size].to(device))
                last[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
    means = {id(s): s.cpu() / windows.numel() for s in sums.values()}     # shared stay shared
    return {name: means[id(s)] for name, s in sums.items()}


def round_weight(W: torch.Tensor, H: torch.Tensor | None, grid: Grid, dtype: torch.dtype,
                 rounding: str) -> Rounded:
    """W on `grid` by `rounding` (gptq needs H, the covariance of W's inputs)."""
    if rounding == "gptq":
        return error_compensated(W, H, grid, dtype)
    return round_to_nearest(W, grid, dtype)


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise RankwiseError(f"rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")


def quantize_factors(model: nn.Module, covariances: dict[str, torch.Tensor] | None, grid: Grid,
                     dtype: torch.dtype, rounding: str = "gptq") -> int:
    """Round every factor of every LowRankLinear onto `grid` in place (scales in `dtype`),
    the rounding `rounding` ('gptq' needs the layers' input covariances C: A is rounded
    in C, then B in Â C Âᵀ); marks each factor with its grid and scale for
    rankwise.ct_format. Returns the number of factors."""
    _check_rounding(rounding)
    count = 0
    with torch.no_grad():
        for name, layer in factored_layers(model).items():
            if is_quantized(layer.A) or is_quantized(layer.B):
                raise RankwiseError(f"{name} already holds quantized factors; quantize the "
                                    "float output it was made from")
            C = covariances[name].double() if rounding == "gptq" else None
            a = round_weight(layer.A.weight, C, grid, dtype, rounding)
            image = None if C is None else a.weight.double() @ C @ a.weight.double().T
            b = round_weight(layer.B.weight, image, grid, dtype, rounding)
            for linear, r in ((layer.A, a), (layer.B, b)):
                _store(linear, r, grid, dtype)
            count += 2
    return count


def _store(linear: nn.Linear, rounded: Rounded, grid: Grid, dtype: torch.dtype) -> None:
    linear.weight.copy_(rounded.weight)
    mark(linear, Grid(grid.bits, rounded.group if grid.group_size else None),
         rounded.scale.to(dtype))


def quantize_model(model: nn.Module, grid: Grid, windows: torch.Tensor, batch_size: int,
                   dtype: torch.dtype, rounding: str = "gptq",
                   dense: dict[str, nn.Linear] | None = None) -> int:
    """Round the factors of a factored model onto `grid`, and the targeted layers the
    allocation kept dense (`dense`) onto the same grid, so every targeted layer is stored
    in the bits asked (a dense model's layers alone: the baseline bench/bytes.py compares
    against, by the very same rounding); the input covariances are measured on `windows` first when the
    rounding needs them (one pass for both). Returns the number of factors."""
    dense = dense or {}
    _check_rounding(rounding)
    covariances = input_covariances(model, windows, batch_size,
                                    {**factored_layers(model), **dense}) \
        if rounding == "gptq" else None
    with torch.no_grad():
        for name, linear in dense.items():
            H = covariances[name].double() if covariances else None
            _store(linear, round_weight(linear.weight, H, grid, dtype, rounding), grid, dtype)
    return quantize_factors(model, covariances, grid, dtype, rounding)


def kept_dense(model: nn.Module, config: dict) -> dict[str, nn.Linear]:
    """The targeted layers (config's include / exclude) the allocation left dense."""
    from .models import target_linears
    return {name: m for name, m in target_linears(model, config.get("include"),
                                                  config.get("exclude")).items()
            if isinstance(m, nn.Linear)}


def mark(linear: nn.Linear, grid: Grid, scale: torch.Tensor) -> None:
    """Record that `linear`'s weight lies on `grid` with `scale` (what the writer stores)."""
    linear.rankwise_grid = grid
    linear.register_buffer("rankwise_scale", scale, persistent=False)


def is_quantized(linear: nn.Module) -> bool:
    return getattr(linear, "rankwise_grid", None) is not None


def stored_bits(linear: nn.Linear) -> int:
    """Bits a linear layer's weight takes as rankwise.ct_format stores it: its integers
    packed in 32-bit words and a 16-bit scale per row or group (the bias not counted)."""
    rows, columns = linear.weight.shape
    groups = linear.rankwise_scale.shape[1]
    return rows * math.ceil(columns * linear.rankwise_grid.bits / 32) * 32 + rows * groups * 16
