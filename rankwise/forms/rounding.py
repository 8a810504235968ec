"""Rounding a weight onto an integer grid (rankwise.forms.grids) in the layer's metric.

A weight W (m x n) fed inputs x_t changes the loss, to first order, by sum_t
|g_t|^2 |(W - Q) x_t|^2 when rounded to Q (g_t the loss gradient at the layer's output,
labels sampled from the model): tr((W - Q) H (W - Q)^T) with H = sum_t |g_t|^2 x_t x_t^T,
the layer's Fisher with each token's output block taken isotropic. Round-to-nearest ignores
H. The error-compensating rounding (GPTQ, Frantar et al. 2022) rounds one input column at
a time and moves the rounding error of column j onto the columns not yet rounded along
H^{-1}'s Cholesky row, which minimises that trace one column at a time. The token weights
matter: with the plain input covariance (every token equal, as GPTQ is usually run) the
attention sink at position 0, whose value vector is near zero and which every later token
reads, counts as one token in 512, and the compensation moves error onto it freely (one
v_proj so rounded took the embedded model's WikiText-2 perplexity from 41 to 1254).

Factors: A reads the layer's inputs (H); B reads A's outputs, Â H Âᵀ with Â the already
rounded A. B is first refitted to what Â lost: the B' minimising E||B A x - B' Â x||^2 is
B A H Âᵀ (Â H Âᵀ)^{-1} (damped toward B), and since that error is E||B A x - B' Â x||^2
plus tr((B' - Q) Â H Âᵀ (B' - Q)^T) for any Q, rounding B' in Â H Âᵀ minimises the
layer's whole output error.

The compensation is greedy, column by column, and nothing bounds its result by
round-to-nearest's (a column clamped at the grid's edge passes its whole error on to the
columns after it), so every compensated matrix is checked against its round-to-nearest
twin in H and the better one kept; the tally counts where round-to-nearest won.

Where the statistics come from (the block walk's hooks, the compressed stream) is
rankwise.cut.plans' business; everything here is a pure function of tensors, except `mark`,
which records on a module what the writer stores (rankwise.formats.compressed).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..geometry import metric_error
from .grids import Grid


@dataclass
class Rounded:
    """A weight on its grid: `weight` (float, = q * scale), `scale` (rows x groups, one
    group for a per-row grid), the grid it is on (fitted to its width) and the rounding
    that produced it."""
    weight: torch.Tensor
    scale: torch.Tensor
    grid: Grid
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

    def record(self, rounding: str) -> dict:
        return {"rounding": rounding, "matrices": self.matrices,
                "nearest_kept": self.nearest_kept}


def round_to_nearest(W: torch.Tensor, grid: Grid, dtype: torch.dtype) -> Rounded:
    W = W.float()
    grid = grid.fitted(W.shape[1])
    m, n = W.shape
    blocks = W.reshape(-1, grid.group_for(n))                      # (m * groups) x g
    scale = grid.scale(blocks, dtype)
    return Rounded(grid.round(blocks, scale).reshape(m, n), scale.reshape(m, -1), grid)


@dataclass
class InverseFactor:
    """What GPTQ reads of an input covariance H: the upper Cholesky factor U of the damped
    H^{-1}, and the inputs that never fire. One per H, whatever is rounded in it."""
    U: torch.Tensor
    dead: torch.Tensor

    @classmethod
    def of(cls, H: torch.Tensor, damping: float = 0.01,
           device: torch.device | None = None) -> "InverseFactor":
        """H damped by `damping` times its mean diagonal; inputs with H_jj = 0 are dead."""
        H = H.to(device or H.device, torch.float64, copy=True)
        n = H.shape[0]
        dead = torch.diagonal(H) <= 0
        H[dead, dead] = 1.0
        H.diagonal().add_(damping * torch.diagonal(H).mean())
        # H^{-1} = L^{-T} L^{-1} through a triangular solve (cholesky_inverse is many times
        # slower on the CPU), then its upper Cholesky factor
        eye = torch.eye(n, dtype=H.dtype, device=H.device)
        L_inverse = torch.linalg.solve_triangular(torch.linalg.cholesky(H), eye, upper=False)
        return cls(torch.linalg.cholesky(L_inverse.T @ L_inverse, upper=True).float(), dead)


def error_compensated(W: torch.Tensor, H: torch.Tensor | InverseFactor, grid: Grid,
                      dtype: torch.dtype) -> Rounded:
    """GPTQ: W (m x n) rounded column by column; each column's error spread over the later
    columns through the upper Cholesky factor of H^{-1} (InverseFactor; H given as a matrix
    is factored here), within a block of columns at once and onto the later blocks by one
    product. A per-row scale comes from the whole row; a group's scale from its columns
    as compensation has left them when the group is reached. Inputs that never fire
    (H_jj = 0) are zeroed."""
    factor = H if isinstance(H, InverseFactor) else InverseFactor.of(H, device=W.device)
    W = W.float().clone()
    m, n = W.shape
    W[:, factor.dead] = 0.0
    grid = grid.fitted(n)
    g = grid.group_for(n)
    scale = torch.empty(m, n // g, device=W.device)     # every tensor where W is
    if g == n:
        scale[:, 0] = grid.scale(W, dtype)
    with _one_thread():       # column-sized operations: thread hand-offs cost more than they do
        Q = _compensate_columns(W, factor.U, scale, grid, dtype, g)
    return Rounded(Q, scale, grid, "gptq")


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
        Wb, Err = W[:, lo:hi].clone(), torch.empty(m, hi - lo, device=W.device)
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


def round_weight(W: torch.Tensor, H: torch.Tensor | None, grid: Grid, dtype: torch.dtype,
                 rounding: str, factor: InverseFactor | None = None) -> Rounded:
    """W on `grid` by `rounding` ('gptq' needs H, the covariance of W's inputs, and keeps
    round-to-nearest where that is better in H: module docstring; `factor`: H's, when
    several widths are rounded in one H)."""
    nearest = round_to_nearest(W, grid, dtype)
    if rounding != "gptq":
        return nearest
    compensated = error_compensated(W, factor or H, grid, dtype)
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
    eye = torch.eye(len(image), dtype=image.dtype, device=image.device)
    return torch.linalg.solve(image + ridge * eye, rhs.T).T


def round_factors(A: torch.Tensor, B: torch.Tensor, H: torch.Tensor | None, grid: Grid,
                  dtype: torch.dtype, rounding: str) -> tuple[Rounded, Rounded]:
    """The factors of y = B A x rounded onto `grid`: A in H (the covariance of x), then B
    refitted to the rounded A and rounded in Â H Âᵀ (module docstring); round-to-nearest
    on both without H."""
    if rounding != "gptq":
        return round_to_nearest(A, grid, dtype), round_to_nearest(B, grid, dtype)
    H = H.double()
    a = round_weight(A, H, grid, dtype, rounding)
    A_rounded = a.weight.double()
    b = round_weight(refit_outer(B, A, A_rounded, H), A_rounded @ H @ A_rounded.T, grid,
                     dtype, rounding)
    return a, b


def store(linear: nn.Linear, rounded: Rounded, dtype: torch.dtype) -> None:
    """Put a rounded weight in place of the layer's and mark it for the writer."""
    with torch.no_grad():
        linear.weight.copy_(rounded.weight)
    mark(linear, rounded.grid, rounded.scale.to(dtype))


def mark(linear: nn.Linear, grid: Grid, scale: torch.Tensor) -> None:
    """Record that `linear`'s weight lies on `grid` with `scale` (what the writer stores)."""
    linear.rankwise_grid = grid
    linear.register_buffer("rankwise_scale", scale, persistent=False)


def is_quantized(linear: nn.Module) -> bool:
    return getattr(linear, "rankwise_grid", None) is not None

