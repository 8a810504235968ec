"""Checked symmetric eigensolvers: float32 first (several times faster on a GPU), checked in
float64, redone in float64 where the check refuses, every solve counted.

The counter (`EIGH_COUNT`) is the process's running total; a compression reports the part
each block added. The decompositions of a block may run on a worker thread beside the walk
(rankwise.pipeline.overlap), so the counter is updated under a lock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass

import torch

# A float32 eigendecomposition is kept when a float64 check finds it accurate to this
# relative tolerance (see `eigh`); otherwise the matrix is decomposed again in float64.
EIGH_RTOL = 1e-3
# At most this many matrices of one size are decomposed in one batched call: a batch's
# float64 copies, its eigenvectors and the solver's workspace (about 7 matrices each on a
# GPU) stay bounded however many layers share a size.
EIGH_BATCH = 4


@dataclass
class EighCount:
    """Symmetric eigendecompositions done since the last reset: how many, how many of
    them were eigenvalues only (`eigvalsh`, a fraction of the work), how many had to be
    redone in float64 (a float32 result the check refused, or a float32 solver that
    raised, as cuSOLVER does on some ill-conditioned inputs), their seconds."""
    decompositions: int = 0
    values_only: int = 0
    float64_redos: int = 0
    seconds: float = 0.0

    def since(self, earlier: "EighCount") -> "EighCount":
        return EighCount(*(getattr(self, f.name) - getattr(earlier, f.name)
                           for f in dataclasses.fields(self)))

    def snapshot(self) -> "EighCount":
        with _LOCK:
            return dataclasses.replace(self)


EIGH_COUNT = EighCount()       # the process's running totals (compress reports per block)
_LOCK = threading.Lock()


def _add(**counts) -> None:
    with _LOCK:
        for name, value in counts.items():
            setattr(EIGH_COUNT, name, getattr(EIGH_COUNT, name) + value)


@contextlib.contextmanager
def _counted(S: torch.Tensor, values_only: bool):
    """Count the decompositions of the stack S and their seconds into EIGH_COUNT."""
    started, count = time.perf_counter(), S.shape[:-2].numel()
    try:
        yield
    finally:
        _add(decompositions=count, values_only=count if values_only else 0,
             seconds=time.perf_counter() - started)


def _float32_solve(solve, S: torch.Tensor):
    """solve(S in float32), or None where the float32 solver gave up (torch's
    LinAlgError and the other errors of a failed solve). Out of memory is not a solver
    giving up: it is raised, never retried at float64's twice the memory."""
    try:
        return solve(S.float())
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:
        return None


def eigh(S: torch.Tensor, floor: torch.Tensor | float | None = None, rtol: float = EIGH_RTOL,
         float32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of symmetric matrices S (..., n,
    n), both float64.

    With `float32` the decomposition runs in float32 first and is checked in float64: the
    eigenvectors are re-orthonormalised (one Newton-Schulz step), the eigenvalues taken as
    their Rayleigh quotients (so a tail sum of them is exactly what cutting those
    directions of this basis costs), and each pair's residual |S q - lam q| bounds the
    error of its eigenvalue. A matrix is kept when every value is finite and
      floor given (roots):     every residual <= rtol * (|lam| + floor), floor per matrix
                               or one number: every eigenvalue above the floor is right to
                               rtol, as a damped inverse square root needs;
      floor None (spectra):    the summed residuals <= rtol * the summed |lam|: the loss
                               spectrum is right to rtol of the layer's whole loss;
    the others are decomposed again in float64.
    """
    with _counted(S, values_only=False):
        return _eigh(S, floor, rtol, float32)


def _eigh(S, floor, rtol, float32):
    S = S.to(torch.float64)
    S = (S + S.mT) / 2
    solved = _float32_solve(torch.linalg.eigh, S) if float32 else None
    if solved is None:
        if float32:
            _add(float64_redos=S.shape[:-2].numel())
        lam, Q = torch.linalg.eigh(S)
        return lam, _signed(Q)
    Q = solved[1].double()
    Q = Q @ (1.5 * torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device) - 0.5 * (Q.mT @ Q))
    SQ = S @ Q
    lam = (Q * SQ).sum(-2)
    residual = (SQ - Q * lam[..., None, :]).norm(dim=-2)
    del SQ
    if floor is None:
        bad = ~(residual.sum(-1) <= rtol * lam.abs().sum(-1))
    else:
        floor = torch.as_tensor(floor, dtype=torch.float64, device=S.device)
        bad = ~(residual <= rtol * (lam.abs() + floor[..., None])).all(-1)
    # written as "not within tolerance" so that a NaN anywhere (which compares False)
    # sends the matrix to float64 rather than through the check
    bad |= ~torch.isfinite(Q).all(-1).all(-1)
    if bad.any():
        _add(float64_redos=int(bad.sum()))
        lam64, Q64 = torch.linalg.eigh(S[bad])
        lam, Q = lam.clone(), Q.clone()
        lam[bad], Q[bad] = lam64, Q64
    order = lam.argsort(-1)
    return lam.gather(-1, order), _signed(Q.gather(-1, order[..., None, :].expand_as(Q)))


def eigvalsh(S: torch.Tensor, rtol: float = EIGH_RTOL) -> torch.Tensor:
    """Eigenvalues (ascending, float64) of symmetric matrices S (..., n, n), without
    eigenvectors: a fraction of `eigh`'s work (the tridiagonal reduction and its eigenvalues,
    no eigenvectors accumulated, on a GPU and a CPU alike), for spectra that only a rank
    allocation reads.

    Computed in float32 first. A backward-stable solver returns the exact eigenvalues of
    S + E with ||E||_F ~ c eps ||S||_F, so their summed errors are at most ||E||_* <=
    sqrt(n) c eps ||S||_F: any tail sum of the spectrum is right to ~sqrt(n) c eps of the
    layer's whole loss (4e-6 c at n = 4096), far inside rtol. What no bound covers, a
    solver that failed, is what the check catches: the eigenvalues' sum and sum of squares
    must match the trace and the squared Frobenius norm (both exact, taken in float64) to
    rtol; a matrix that misses either, or whose float32 solve raised, is solved again in
    float64 (counted as a redo)."""
    with _counted(S, values_only=True):
        return _eigvalsh(S, rtol)


def _eigvalsh(S, rtol):
    S = S.to(torch.float64)
    S = (S + S.mT) / 2
    lam = _float32_solve(torch.linalg.eigvalsh, S)
    if lam is None:
        _add(float64_redos=S.shape[:-2].numel())
        return torch.linalg.eigvalsh(S)
    lam = lam.double()
    trace = S.diagonal(dim1=-2, dim2=-1).sum(-1)
    frobenius = torch.linalg.vector_norm(S, dim=(-2, -1)).square()
    bad = ~torch.isfinite(lam).all(-1) \
        | ~((lam.sum(-1) - trace).abs() <= rtol * lam.abs().sum(-1)) \
        | ~((lam.square().sum(-1) - frobenius).abs() <= rtol * frobenius)
    if bad.any():
        _add(float64_redos=int(bad.sum()))
        lam = lam.clone()
        lam[bad] = torch.linalg.eigvalsh(S[bad])
    return lam.sort(-1).values


def _signed(Q: torch.Tensor) -> torch.Tensor:
    """Eigenvectors with the sign that makes each one's largest entry positive: the same
    factors whichever solver (and process) produced them, which matters to anything that
    trains them afterwards (Adam is not invariant to a flipped factor pair)."""
    top = Q.abs().argmax(-2, keepdim=True)
    return Q * torch.sign(Q.gather(-2, top)).clamp_min(0).mul(2).sub(1)


def batched(matrices: list, solve) -> list:
    """solve(stack) on the same-sized matrices of `matrices`, at most EIGH_BATCH at a time;
    each result split back per matrix. The list lets go of each matrix as it is stacked,
    so one copy of a batch is alive, not two."""
    out: list = [None] * len(matrices)
    by_size: dict[int, list[int]] = {}
    for i, K in enumerate(matrices):
        by_size.setdefault(K.shape[-1], []).append(i)
    for same_size in by_size.values():
        for lo in range(0, len(same_size), EIGH_BATCH):
            idx = same_size[lo:lo + EIGH_BATCH]
            K = torch.stack([matrices[i] for i in idx])
            for i in idx:
                matrices[i] = None
            result = solve(K)
            del K
            for j, i in enumerate(idx):
                out[i] = tuple(t[j] for t in result) if isinstance(result, tuple) else result[j]
    return out
