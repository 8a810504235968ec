"""Square roots of damped statistics: what turns a covariance into a metric.

A root of a PSD statistic S is any F with S + d * mean eigenvalue * I = F^T F (d the
relative damping). Projections, anchored fits and weighted errors need only |F X| or F X
F^T, which every square root gives alike, so they take the Cholesky factor (a fraction of
an eigendecomposition's work); training's proximal steps take the symmetric root.

Every root records the damping it really took (`Root.damping`): round-off can make a
statistic summed from float32 products indefinite below the damping asked for, and the
Cholesky is then retried with a larger one, which callers log and record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import RankwiseError
from . import solvers

DEFAULT_DAMPING = 1e-6
# A sum of outer products is PSD, but one summed from float32 products (every statistic
# here) has eigenvalues down to about -eps32 * sqrt(tokens) * its trace: where the
# statistics are rank-deficient or nearly (fewer tokens than features, wide layers) they
# reach below the damping, and Cholesky refuses. Such directions are not resolved by the
# statistics at all, so the Cholesky is retried with the damping raised tenfold at a time,
# up to this fraction of the mean eigenvalue, before an eigendecomposition is paid for.
ROUNDOFF_DAMPING = 1e-2
# The least relative lift a root's inverse gets, whatever damping was asked for: with a
# damping of 0 an exactly singular statistic (a dead feature, fewer tokens than features)
# has no finite inverse root, and its Cholesky would be retried from zero forever. Well
# below float32's resolution, so it changes nothing a statistic resolves.
DAMPING_FLOOR = 1e-10


@dataclass
class Root:
    """A square root F of a damped PSD matrix S (S + d mean I = F^T F) and its inverse, or
    of a diagonal: symmetric (psd_root, from an eigendecomposition) or upper triangular
    (cholesky_root). Applied as F X on the left and X F^T on the right, which for a
    symmetric root is the same. `damping` is the d it took."""
    half: torch.Tensor
    inv_half: torch.Tensor
    damping: float = 0.0

    @property
    def diagonal(self) -> bool:
        return self.half.dim() == 1

    def to(self, dtype: torch.dtype) -> "Root":
        return Root(self.half.to(dtype), self.inv_half.to(dtype), self.damping)


def damping_tries(damping: float) -> list[float]:
    """The dampings a Cholesky root tries, in order: the one asked for, then tenfold steps
    from at least DAMPING_FLOOR up to ROUNDOFF_DAMPING (never past the one asked for when
    that is larger): at most a dozen tries, whatever `damping` is."""
    tries, d = [damping], max(damping, DAMPING_FLOOR)
    if d > damping:
        tries.append(d)
    while d * 10 <= max(ROUNDOFF_DAMPING, damping) * (1 + 1e-9):
        d *= 10
        tries.append(d)
    return tries


def check_finite(S: torch.Tensor) -> None:
    if not torch.isfinite(S).all():
        raise RankwiseError("statistics contain NaN or Inf; the model produced non-finite "
                            "activations or gradients on the calibration data")


def psd_root(S: torch.Tensor, damping: float = DEFAULT_DAMPING) -> Root:
    """Square root and inverse square root of a PSD matrix (2-D) or diagonal (1-D).

    Uses a symmetric eigendecomposition, clips negative round-off to zero and adds
    `damping * mean eigenvalue` (at least DAMPING_FLOOR times it), so singular or
    ill-conditioned statistics (dead features, fewer tokens than features) give finite
    roots. An all-zero matrix gives the identity.
    """
    return _roots([S], damping)[0]


def _roots(stats: list, damping: float) -> list[Root]:
    """psd_root of each statistic (a Root given is kept as it is), the same-sized matrices
    decomposed in one batch."""
    out: list[Root | None] = [None] * len(stats)
    by_size: dict[int, list[int]] = {}
    for i, S in enumerate(stats):
        if isinstance(S, Root):
            out[i] = S
            continue
        check_finite(S)
        if S.dim() == 1:
            lam = S.to(torch.float64).clamp_min(0)
            out[i] = Root(*_damped(lam, damping, lam.mean()), damping)
        else:
            by_size.setdefault(S.shape[-1], []).append(i)
    for idx in by_size.values():
        S = torch.stack([stats[i].to(torch.float64) for i in idx])
        mean = S.diagonal(dim1=-2, dim2=-1).clamp_min(0).mean(-1)
        lam, Q = solvers.eigh(S, floor=max(damping, DAMPING_FLOOR) * mean)
        for j, i in enumerate(idx):
            half, inv_half = _damped(lam[j].clamp_min(0), damping, mean[j])
            out[i] = Root((Q[j] * half) @ Q[j].T, (Q[j] * inv_half) @ Q[j].T, damping)
    return out


def cholesky_root(S: torch.Tensor, damping: float = DEFAULT_DAMPING) -> Root:
    """A triangular square root of a PSD matrix: F upper triangular with
    S + d * mean eigenvalue * I = F^T F, and its inverse; a Cholesky and a triangular
    solve, a small fraction of an eigendecomposition's work. d is the first of
    `damping_tries(damping)` that Cholesky takes (round-off leaves S with eigenvalues below
    -damping * mean). Wherever only |F x| or F X F^T is needed (a projection, an anchored
    fit, a weighted error) it serves as well as the symmetric root. A diagonal, an all-zero
    matrix and a matrix no such Cholesky takes get what `psd_root` gives them."""
    return triangular_roots([S], damping)[0]


def triangular_roots(stats: list, damping: float) -> list[Root]:
    """cholesky_root of each statistic (a Root given is kept as it is)."""
    out: list[Root | None] = [None] * len(stats)
    rest = []
    for i, S in enumerate(stats):
        if isinstance(S, Root) or S.dim() == 1:
            rest.append(i)
            continue
        check_finite(S)
        S64 = S.to(torch.float64)
        mean = S64.diagonal().clamp_min(0).mean()
        shifted = _shifted_cholesky(S64, mean, damping) if mean > 0 else None
        if shifted is None:
            rest.append(i)
            continue
        upper, taken = shifted
        eye = torch.eye(S64.shape[-1], dtype=S64.dtype, device=S64.device)
        out[i] = Root(upper, torch.linalg.solve_triangular(upper, eye, upper=True), taken)
    for i, root in zip(rest, _roots([stats[i] for i in rest], damping)):
        out[i] = root
    return out


def _shifted_cholesky(S: torch.Tensor, mean: torch.Tensor, damping: float
                      ) -> tuple[torch.Tensor, float] | None:
    """(upper F, d) with S + d * mean * I = F^T F for the first d of damping_tries that
    Cholesky takes and whose inverse is finite; None if none does."""
    for d in damping_tries(damping):
        shifted = S.clone()
        shifted.diagonal().add_(d * mean)
        lower, info = torch.linalg.cholesky_ex(shifted)
        if info == 0 and bool(lower.diagonal().min() > 0):
            return lower.T, d
    return None


def _damped(lam: torch.Tensor, damping: float, mean: torch.Tensor):
    """(sqrt, 1/sqrt) of eigenvalues lifted by damping * mean, and at least to
    DAMPING_FLOOR * mean (the identity when all are zero)."""
    if not mean > 0:
        lam = torch.ones_like(lam)
    else:
        lam = (lam + damping * mean).clamp_min(DAMPING_FLOOR * mean)
    return lam.sqrt(), lam.rsqrt()


class SharedRoots:
    """psd_root, memoised per statistics tensor: a covariance shared by several layers
    (q/k/v, gate/up) is decomposed once. The memo holds the tensors it was given, so an
    id() cannot be reused by another tensor while it is in the memo."""

    def __init__(self):
        self._cache: dict[int, tuple[torch.Tensor, Root]] = {}

    def __call__(self, S: torch.Tensor, damping: float) -> Root:
        hit = self._cache.get(id(S))
        if hit is None or hit[0] is not S:
            hit = self._cache[id(S)] = (S, psd_root(S, damping))
        return hit[1]


def raised(root: Root | None, damping: float) -> float | None:
    """The damping a root took when it is more than `damping` asked for, else None."""
    if root is None or root.damping <= damping * (1 + 1e-9) or math.isnan(root.damping):
        return None
    return root.damping
