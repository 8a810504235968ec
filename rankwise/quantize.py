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
C; the outer factor B reads A's outputs, covariance Â C Âᵀ with Â the already rounded A.
B is first refitted to what Â lost: the B' minimising E||B A x - B' Â x||^2 is
B A C Âᵀ (Â C Âᵀ)^{-1} (damped toward B), and since that error is E||B A x - B' Â x||^2
plus tr((B' - Q) Â C Âᵀ (B' - Q)^T) for any Q, rounding B' in Â C Âᵀ minimises the
layer's whole output error. C is measured on the compressed model itself (its inputs are
what the factors will see), each token weighted by the squared gradient at the layer's
output (input_covariances says why), in one forward and backward pass per batch.

The compensation is greedy, column by column, and nothing bounds its result by
round-to-nearest's (a column clamped at the grid's edge passes its whole error on to the
columns after it), so every error-compensated matrix is checked against its
round-to-nearest twin in the same metric and the better one is kept; the count of
matrices where round-to-nearest won is reported (none on the embedded model).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RankwiseError
from .geometry import metric_error
from .layers import LowRankLinear
from .stats import (activation_gradients_only, gradients_reach_the_layers, lm_logits,
                    sample_logit_gradient)

log = logging.getLogger(__name__)

FACTOR_BITS = (8, 4)      # what an output stores; the grids themselves take 2 to 8 bits
ROUNDINGS = {"gptq": "error-compensating, column by column in the layer's input covariance "
                     "with each token weighted by its output gradient (GPTQ)",
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
    group for a per-row grid), the group width and the rounding that produced it."""
    weight: torch.Tensor
    scale: torch.Tensor
    group: int
    rounding: str = "rtn"


@dataclass
class Tally:
    """What a model's rounding did: matrices rounded, and how many of those the
    error-compensated rounding left to round-to-nearest (module docstring)."""
    matrices: int = 0
    nearest_kept: int = 0

    def add(self, rounded: Rounded, rounding: str) -> None:
        self.matrices += 1
        self.nearest_kept += rounding == "gptq" and rounded.rounding == "rtn"

    def record(self, grid: Grid, rounding: str) -> dict:
        """The manifest's `factor_rounding`."""
        return {"bits": grid.bits, "group_size": grid.group_size, "rounding": rounding,
                "matrices": self.matrices, "nearest_kept": self.nearest_kept}


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
    return Rounded(Q, scale, g, "gptq")


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
                      layers: dict[str, nn.Module] | None = None, seed: int = 0
                      ) -> dict[str, torch.Tensor]:
    """H = sum_t w_t x_t x_t^T / sum_t w_t over the inputs x_t of each of `layers` (default:
    every factored layer), every token weighted by how much the loss feels the layer's
    output there: w_t = |g_t|^2, the squared gradient of the summed cross-entropy at the
    layer's output, labels sampled from the model as the statistics draw them (one
    forward and backward pass per batch; products in float32, sums in float64).

    That is the layer's Fisher with each token's output-side block replaced by its trace
    (K-FAC's G taken isotropic within a token), which keeps the row-by-row structure the
    rounding needs. Unweighted, a token the rest of the window reads (the attention sink
    at position 0, whose value vector is near zero) counts as one token in 512, and the
    error-compensated rounding moves error onto it freely while every token attending to
    it inherits that error: on the embedded model one v_proj rounded so took WikiText-2
    perplexity from 41 to 1254 (README, Bytes)."""
    layers = factored_layers(model) if layers is None else layers
    sums: dict[str, torch.Tensor] = {}
    mass = dict.fromkeys(layers, 0.0)

    def weigh(name, x):
        def add(g):
            w = g.detach().float().square().sum(-1).reshape(-1, 1)
            weighted = x.reshape(-1, x.shape[-1]).float() * w.sqrt()
            sums[name] = sums.get(name, 0) + (weighted.T @ weighted).double()
            mass[name] += float(w.sum())
        return add

    def hook(name):
        def record(module, args, out):
            if out.requires_grad:
                out.register_hook(weigh(name, args[0].detach()))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), activation_gradients_only(model), \
                gradients_reach_the_layers(model):
            for lo in range(0, len(windows), batch_size):
                logits = lm_logits(model, windows[lo:lo + batch_size])
                logits.backward(sample_logit_gradient(logits, generator))
                del logits
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise RankwiseError(f"no gradient reached {missing[0]} (and {len(missing) - 1} more) "
                            "in the calibration pass; it cannot be rounded in its metric")
    return {name: (s / max(mass[name], torch.finfo(torch.float64).tiny)).cpu()
            for name, s in sums.items()}


def round_weight(W: torch.Tensor, H: torch.Tensor | None, grid: Grid, dtype: torch.dtype,
                 rounding: str) -> Rounded:
    """W on `grid` by `rounding` ('gptq' needs H, the covariance of W's inputs, and keeps
    round-to-nearest where that is better in H: module docstring)."""
    nearest = round_to_nearest(W, grid, dtype)
    if rounding != "gptq":
        return nearest
    compensated = error_compensated(W, H, grid, dtype)
    # tr((W - Q) H (W - Q)^T): the expected squared output change for inputs of covariance H
    better = metric_error(W, compensated.weight, right=H) <= metric_error(W, nearest.weight, right=H)
    return compensated if better else nearest


def refit_outer(B: torch.Tensor, A: torch.Tensor, A_rounded: torch.Tensor, C: torch.Tensor,
                damping: float = 1e-4) -> torch.Tensor:
    """B' minimising E||B A x - B' Â x||^2 over inputs of covariance C, ridged toward B by
    `damping` times the mean eigenvalue of Â C Âᵀ (module docstring); float64."""
    B, A, A_rounded, C = (t.double() for t in (B, A, A_rounded, C))
    image = A_rounded @ C @ A_rounded.T
    ridge = damping * float(torch.diagonal(image).mean().clamp_min(torch.finfo(image.dtype).tiny))
    rhs = B @ (A @ C @ A_rounded.T) + ridge * B
    # image + ridge I is symmetric positive definite: B' = rhs (image + ridge I)^{-1}
    return torch.linalg.solve(image + ridge * torch.eye(len(image), dtype=image.dtype), rhs.T).T


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise RankwiseError(f"rounding must be one of {sorted(ROUNDINGS)}, got {rounding!r}")


def quantize_factors(model: nn.Module, covariances: dict[str, torch.Tensor] | None, grid: Grid,
                     dtype: torch.dtype, rounding: str = "gptq", tally: Tally | None = None
                     ) -> Tally:
    """Round every factor of every LowRankLinear onto `grid` in place (scales in `dtype`),
    the rounding `rounding` ('gptq' needs the layers' input covariances C: A is rounded
    in C, then B refitted to Â and rounded in Â C Âᵀ); marks each factor with its grid and
    scale for rankwise.ct_format. Returns the tally (added to `tally` when given)."""
    _check_rounding(rounding)
    tally = tally or Tally()
    with torch.no_grad():
        for name, layer in factored_layers(model).items():
            if is_quantized(layer.A) or is_quantized(layer.B):
                raise RankwiseError(f"{name} already holds quantized factors; quantize the "
                                    "float output it was made from")
            if rounding == "gptq":
                C = covariances[name].double()
                a = round_weight(layer.A.weight, C, grid, dtype, rounding)
                A_rounded = a.weight.double()
                b = round_weight(refit_outer(layer.B.weight, layer.A.weight, A_rounded, C),
                                 A_rounded @ C @ A_rounded.T, grid, dtype, rounding)
            else:
                a, b = (round_to_nearest(f.weight, grid, dtype) for f in (layer.A, layer.B))
            for linear, r in ((layer.A, a), (layer.B, b)):
                _store(linear, r, grid, dtype)
                tally.add(r, rounding)
    return tally


def _store(linear: nn.Linear, rounded: Rounded, grid: Grid, dtype: torch.dtype) -> None:
    linear.weight.copy_(rounded.weight)
    mark(linear, Grid(grid.bits, rounded.group if grid.group_size else None),
         rounded.scale.to(dtype))


def quantize_model(model: nn.Module, grid: Grid, windows: torch.Tensor, batch_size: int,
                   dtype: torch.dtype, rounding: str = "gptq",
                   dense: dict[str, nn.Linear] | None = None) -> Tally:
    """Round the factors of a factored model onto `grid`, and the targeted layers the
    allocation kept dense (`dense`) onto the same grid, so every targeted layer is stored
    in the bits asked (a dense model's layers alone: the baseline bench/bytes.py compares
    against, by the very same rounding); the input covariances are measured on `windows`
    first when the rounding needs them (one pass for both). Returns the tally."""
    dense = dense or {}
    _check_rounding(rounding)
    covariances = input_covariances(model, windows, batch_size,
                                    {**factored_layers(model), **dense}) \
        if rounding == "gptq" else None
    tally = Tally()
    with torch.no_grad():
        for name, linear in dense.items():
            H = covariances[name].double() if covariances else None
            rounded = round_weight(linear.weight, H, grid, dtype, rounding)
            _store(linear, rounded, grid, dtype)
            tally.add(rounded, rounding)
    quantize_factors(model, covariances, grid, dtype, rounding, tally)
    if tally.nearest_kept:
        log.info("%d of %d matrices kept round-to-nearest: error compensation was worse "
                 "there in their input covariance", tally.nearest_kept, tally.matrices)
    return tally


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
