"""The mathematical heart: project a weight onto the rank-r set in a chosen metric.

Pure functions on tensors; no hooks, no models, no I/O; float64 inside.

A metric is a pair (left, right) of positive semi-definite weights on the output and input
side of `W` (m x n); the projection solves

    min_{rank(W_r) <= r}  || L^{1/2} (W - W_r) R^{1/2} ||_F

  svd     left = I,        right = I          (Frobenius; baseline)
  whiten  left = I,        right = C = sum x x^T            (SVD-LLM / ASVD)
  fisher  left = diag(G),  right = I          (FWSVD: output-wise Fisher weights)
  kfac    left = G = sum g g^T,  right = C    (Kronecker-factored Fisher; the KL's
                                                second-order term)

With M = L^{1/2} W R^{1/2} = U S V^T the optimum is W_r = L^{-1/2} U_r U_r^T L^{1/2} W
= W R^{1/2} V_r V_r^T R^{-1/2}. Only one side ever needs a root: the left form takes U from
the m x m Gram matrix L^{1/2} W R W^T L^{1/2} (R enters as is), the right form takes V from
the n x n Gram R^{1/2} W^T L W R^{1/2} (L enters as is). We use the smaller side, so no
eigendecomposition of the larger covariance is ever computed (e.g. down_proj's 1536-wide
input covariance), and only the root of the side in use is damped. Any square root F
with L = F^T F serves (||L^{1/2} X||_F = ||F X||_F, and F K F^T has the eigenvalues of
L^{1/2} K L^{1/2}), so the roots here are Cholesky factors, not eigendecompositions. The
eigenvalues of the
Gram matrix are S^2, the loss of dropping each direction in the metric: the spectrum rank
allocation spends.

Anchored projection (`anchored`). Compressing the blocks below a layer changes what it
reads: on calibration token t it sees x_c(t) from the compressed model where the dense
model saw x_d(t). Fit its factors to reproduce the *dense* layer's output on the *dense*
stream from the compressed one, in the same K-FAC metric (the second-order KL of the
layer's output error e = W_r x_c - W x_d):

    sum_t e^T G e = tr(G W_r C W_r^T) - 2 tr(G W_r X W^T) + tr(G W D W^T),
    C = sum x_c x_c^T,  X = sum x_c x_d^T (the cross-covariance),  D = sum x_d x_d^T.

Completing the square with W* = W X^T C^{-1} (the regression of the dense outputs on the
compressed inputs) gives

    sum_t e^T G e = || G^{1/2} (W_r - W*) C^{1/2} ||_F^2 + const,

so the best rank-r W_r is the ordinary projection of W* in the metric (G, C), and its
spectrum the loss of dropping each direction beyond the best full-rank fit. The damping
lambda I that every covariance here gets is a ridge toward the dense weight: adding
lambda ||G^{1/2} (W_r - W)||_F^2 to the objective gives W* = W (X^T + lambda I)(C + lambda I)^{-1}
in the metric (G, C + lambda I), so a direction the compressed stream hardly visits keeps
the dense map instead of a regression coefficient fitted to round-off (a cut value
projection leaves the next layer's inputs rank-deficient). With equal streams X = C and
W* = W exactly: the plain K-FAC projection. Only the sides the small form needs are formed:
W* C W*^T = Z Z^T with Z = W (X^T + lambda I) C^{-1/2} (m x m) for m <= n, and W*^T G W* =
M^T (W^T G W) M with M = (X^T + lambda I) C^{-1} (n x n) for m > n, so G itself (m x m) is
never needed there. `mix` in [0, 1] blends the target from the compressed stream's own
outputs (0: X replaced by C, the sequential fit, W* = W) to the dense ones (1).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch

from .errors import RankwiseError

DEFAULT_DAMPING = 1e-6


@dataclass
class Factors:
    B: torch.Tensor          # m x r
    A: torch.Tensor          # r x n
    spectrum: torch.Tensor   # min(m, n) squared singular values in the metric, descending


@dataclass
class Root:
    """A square root F of a damped PSD matrix S (S = F^T F) and its inverse, or a diagonal:
    symmetric (psd_root, from an eigendecomposition; what training's proximal steps take)
    or upper triangular (cholesky_root; what projections and anchored fits take, since
    they are the same with any square root: ||G^{1/2} X||_F = ||F X||_F). Applied as
    F X on the left and X F^T on the right, which for a symmetric root is the same."""
    half: torch.Tensor
    inv_half: torch.Tensor

    @property
    def diagonal(self) -> bool:
        return self.half.dim() == 1


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


EIGH_COUNT = EighCount()       # the process's running totals (compress reports per block)


def eigh(S: torch.Tensor, floor: torch.Tensor | float | None = None, rtol: float = EIGH_RTOL,
         float32: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of symmetric matrices S (..., n,
    n), both float64.

    With `float32` the decomposition runs in float32 first (several times faster on a GPU)
    and is checked in float64: the eigenvectors are re-orthonormalised (one Newton-Schulz
    step), the eigenvalues taken as their Rayleigh quotients (so a tail sum of them is
    exactly what cutting those directions of this basis costs), and each pair's residual
    |S q - lam q| bounds the error of its eigenvalue. A matrix is kept when
      floor given (roots):     every residual <= rtol * (|lam| + floor), floor per matrix
                               or one number: every eigenvalue above the floor is right to
                               rtol, as a damped inverse square root needs;
      floor None (spectra):    the summed residuals <= rtol * the summed |lam|: the loss
                               spectrum is right to rtol of the layer's whole loss;
    the others are decomposed again in float64.
    """
    with _counted(S, values_only=False):
        return _eigh(S, floor, rtol, float32)


@contextlib.contextmanager
def _counted(S: torch.Tensor, values_only: bool):
    """Count the decompositions of the stack S and their seconds into EIGH_COUNT."""
    started, count = time.perf_counter(), S.shape[:-2].numel()
    try:
        yield
    finally:
        EIGH_COUNT.decompositions += count
        EIGH_COUNT.values_only += count if values_only else 0
        EIGH_COUNT.seconds += time.perf_counter() - started


def _eigh(S, floor, rtol, float32):
    S = S.to(torch.float64)
    S = (S + S.mT) / 2
    if not float32:
        lam, Q = torch.linalg.eigh(S)
        return lam, _signed(Q)
    try:
        Q = torch.linalg.eigh(S.float())[1].double()
    except RuntimeError:       # torch.linalg.LinAlgError too: the float32 solver gave up
        EIGH_COUNT.float64_redos += S.shape[:-2].numel()
        lam, Q = torch.linalg.eigh(S)
        return lam, _signed(Q)
    Q = Q @ (1.5 * torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device) - 0.5 * (Q.mT @ Q))
    SQ = S @ Q
    lam = (Q * SQ).sum(-2)
    residual = (SQ - Q * lam[..., None, :]).norm(dim=-2)
    del SQ
    if floor is None:
        bad = residual.sum(-1) > rtol * lam.abs().sum(-1)
    else:
        floor = torch.as_tensor(floor, dtype=torch.float64, device=S.device)
        bad = (residual > rtol * (lam.abs() + floor[..., None])).any(-1)
    if bad.any():
        EIGH_COUNT.float64_redos += int(bad.sum())
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
    try:
        lam = torch.linalg.eigvalsh(S.float()).double()
    except RuntimeError:       # torch.linalg.LinAlgError too: the float32 solver gave up
        EIGH_COUNT.float64_redos += S.shape[:-2].numel()
        return torch.linalg.eigvalsh(S)
    trace = S.diagonal(dim1=-2, dim2=-1).sum(-1)
    frobenius = torch.linalg.vector_norm(S, dim=(-2, -1)).square()
    bad = ~torch.isfinite(lam).all(-1) \
        | ((lam.sum(-1) - trace).abs() > rtol * lam.abs().sum(-1)) \
        | ((lam.square().sum(-1) - frobenius).abs() > rtol * frobenius)
    if bad.any():
        EIGH_COUNT.float64_redos += int(bad.sum())
        lam = lam.clone()
        lam[bad] = torch.linalg.eigvalsh(S[bad])
    return lam.sort(-1).values


def _signed(Q: torch.Tensor) -> torch.Tensor:
    """Eigenvectors with the sign that makes each one's largest entry positive: the same
    factors whichever solver (and process) produced them, which matters to anything that
    trains them afterwards (Adam is not invariant to a flipped factor pair)."""
    top = Q.abs().argmax(-2, keepdim=True)
    return Q * torch.sign(Q.gather(-2, top)).clamp_min(0).mul(2).sub(1)


def psd_root(S: torch.Tensor, damping: float = DEFAULT_DAMPING) -> Root:
    """Square root and inverse square root of a PSD matrix (2-D) or diagonal (1-D).

    Uses a symmetric eigendecomposition, clips negative round-off to zero and adds
    `damping * mean eigenvalue`, so singular or ill-conditioned statistics (dead features,
    fewer tokens than features) give finite roots. An all-zero matrix gives the identity.
    """
    return _roots([S], damping)[0]


def _check_finite(S: torch.Tensor) -> None:
    if not torch.isfinite(S).all():
        raise RankwiseError("statistics contain NaN or Inf; the model produced non-finite "
                            "activations or gradients on the calibration data")


def _roots(stats: list, damping: float) -> list[Root]:
    """psd_root of each statistic (a Root given is kept as it is), the same-sized matrices
    decomposed in one batch."""
    out: list[Root | None] = [None] * len(stats)
    by_size: dict[int, list[int]] = {}
    for i, S in enumerate(stats):
        if isinstance(S, Root):
            out[i] = S
            continue
        _check_finite(S)
        if S.dim() == 1:
            lam = S.to(torch.float64).clamp_min(0)
            out[i] = Root(*_damped(lam, damping, lam.mean()))
        else:
            by_size.setdefault(S.shape[-1], []).append(i)
    for idx in by_size.values():
        S = torch.stack([stats[i].to(torch.float64) for i in idx])
        mean = S.diagonal(dim1=-2, dim2=-1).clamp_min(0).mean(-1)
        lam, Q = eigh(S, floor=damping * mean)
        for j, i in enumerate(idx):
            half, inv_half = _damped(lam[j].clamp_min(0), damping, mean[j])
            out[i] = Root((Q[j] * half) @ Q[j].T, (Q[j] * inv_half) @ Q[j].T)
    return out


# A sum of outer products is PSD, but one summed from float32 products (every statistic
# here) has eigenvalues down to about -eps32 * sqrt(tokens) * its trace: where the
# statistics are rank-deficient or nearly (fewer tokens than features, wide layers) they
# reach below the damping, and Cholesky refuses. Such directions are not resolved by the
# statistics at all, so the Cholesky is retried with the damping raised tenfold at a time,
# up to this fraction of the mean eigenvalue, before an eigendecomposition is paid for.
ROUNDOFF_DAMPING = 1e-2


def cholesky_root(S: torch.Tensor, damping: float = DEFAULT_DAMPING) -> Root:
    """A triangular square root of a PSD matrix: F upper triangular with
    S + d * mean eigenvalue * I = F^T F, and its inverse; a Cholesky and a triangular
    solve, a small fraction of an eigendecomposition's work. d is `damping`, or, where
    round-off leaves S with eigenvalues below -damping * mean, the first of 10, 100, ...
    times it (at most ROUNDOFF_DAMPING) that absorbs them. Wherever only |F x| or F X F^T
    is needed (a projection, an anchored fit, a weighted error) it serves as well as the
    symmetric root. A diagonal, an all-zero matrix and a matrix no such Cholesky takes get
    what `psd_root` gives them."""
    return _triangular_roots([S], damping)[0]


def _triangular_roots(stats: list, damping: float) -> list[Root]:
    """cholesky_root of each statistic (a Root given is kept as it is)."""
    out: list[Root | None] = [None] * len(stats)
    rest = []
    for i, S in enumerate(stats):
        if isinstance(S, Root) or S.dim() == 1:
            rest.append(i)
            continue
        _check_finite(S)
        S64 = S.to(torch.float64)
        mean = S64.diagonal().clamp_min(0).mean()
        upper = _shifted_cholesky(S64, mean, damping) if mean > 0 else None
        if upper is None:
            rest.append(i)
            continue
        eye = torch.eye(S64.shape[-1], dtype=S64.dtype, device=S64.device)
        out[i] = Root(upper, torch.linalg.solve_triangular(upper, eye, upper=True))
    for i, root in zip(rest, _roots([stats[i] for i in rest], damping)):
        out[i] = root
    return out


def _shifted_cholesky(S: torch.Tensor, mean: torch.Tensor, damping: float) -> torch.Tensor | None:
    """Upper F with S + d * mean * I = F^T F for the first d of damping, 10 damping, ...
    (at most ROUNDOFF_DAMPING, and always damping itself) that Cholesky takes; None if none."""
    d = damping
    while True:
        shifted = S.clone()
        shifted.diagonal().add_(d * mean)
        lower, info = torch.linalg.cholesky_ex(shifted)
        if info == 0:
            return lower.T
        d *= 10
        if d > max(ROUNDOFF_DAMPING, damping):
            return None


def _damped(lam: torch.Tensor, damping: float, mean: torch.Tensor):
    """(sqrt, 1/sqrt) of eigenvalues lifted by damping * mean (the identity when all zero)."""
    lam = lam + damping * mean if mean > 0 else torch.ones_like(lam)
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


def _apply(root: Root, X: torch.Tensor, inverse: bool = False, side: str = "left") -> torch.Tensor:
    """F X (side left) or X F^T (side right), F the root or its inverse."""
    R = root.inv_half if inverse else root.half
    if root.diagonal:
        return R[:, None] * X if side == "left" else X * R
    return R @ X if side == "left" else X @ R.T


def _weigh(S: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
    """S X for a PSD statistic S given as a matrix, a diagonal vector, or None (identity)."""
    if S is None:
        return X
    S = S.to(torch.float64)
    return S[:, None] * X if S.dim() == 1 else S @ X


@dataclass
class Decomposition:
    """A weight's singular directions in a metric, from which the best factors of any rank
    are read off without another decomposition (rank allocation tries many ranks)."""
    W: torch.Tensor                 # m x n, as given (read in float64 when factors are made)
    basis: torch.Tensor             # U (m x k, left form) or V (n x k, right form), descending
    spectrum: torch.Tensor          # k = min(m, n) squared singular values, descending
    root: Root | None               # L (left form) or R (right form); None = identity
    left_form: bool

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced float64 (B, A) of the best rank-`rank` approximation in the metric.
        Each rank-one term is balanced on its own, so the factors of a lower rank are
        the leading columns of B and rows of A."""
        k = self.spectrum.numel()
        if not 1 <= rank <= k:
            raise RankwiseError(f"rank must be in [1, {k}] for a {tuple(self.W.shape)} weight, got {rank}")
        Q, R, W = self.basis[:, :rank], self.root, self.W.to(torch.float64)
        if self.left_form:     # W_r = L^{-1/2} U_r U_r^T L^{1/2} W
            B = _apply(R, Q, inverse=True) if R is not None else Q
            A = Q.T @ (_apply(R, W) if R is not None else W)
        else:                  # W_r = W R^{1/2} V_r V_r^T R^{-1/2}
            B = (_apply(R, W, side="right") if R is not None else W) @ Q
            A = _apply(R, Q.T, inverse=True, side="right") if R is not None else Q.T
        return balance(B, A)

    def dropped_loss(self, rank: int) -> float:
        """The metric error of the rank-`rank` approximation: the dropped spectrum's sum."""
        return float(self.spectrum[rank:].sum())


def decompose(W: torch.Tensor, left: torch.Tensor | None = None,
              right: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING, *,
              left_image: torch.Tensor | None = None,
              right_image: torch.Tensor | None = None) -> Decomposition:
    """Singular directions of W in the metric (left, right).

    left: output-side statistic L (m x m matrix, m-vector diagonal, or None = identity);
    right: input-side statistic R (n x n matrix or None = identity).
    right_image = W R W^T and left_image = W^T L W may be given instead of the larger side's
    statistic: for m <= n only (left, right_image) are used, for m > n only
    (right, left_image).
    """
    return decompose_many([(W, dict(left=left, right=right, left_image=left_image,
                                     right_image=right_image))], damping)[0]


def decompose_many(problems: list[tuple[torch.Tensor, dict]],
                   damping: float = DEFAULT_DAMPING) -> list[Decomposition]:
    """`decompose` for many weights at once, each given as (W, its keyword arguments):
    a statistic shared by several weights (the same tensor object, e.g. the input
    covariance of q/k/v) is rooted once, and matrices of the same size are decomposed
    in one batch."""
    forms, stats, roots, grams = _grams(problems, damping)
    solved = _batched(grams, eigh)
    return [Decomposition(W=W, basis=Q.flip(1), spectrum=lam.flip(0).clamp_min(0),
                          left_form=left_form, root=roots.get(id(S)) if S is not None else None)
            for (W, _), left_form, S, (lam, Q) in zip(problems, forms, stats, solved)]


def spectra_many(problems: list[tuple[torch.Tensor, dict]],
                 damping: float = DEFAULT_DAMPING) -> list[torch.Tensor]:
    """The spectra of `decompose_many`'s decompositions (descending) without their bases:
    what a rank allocation reads. Eigenvalues alone are a fraction of an eigendecomposition's
    work (no eigenvectors accumulated; see `eigvalsh`)."""
    return [lam.flip(0).clamp_min(0) for lam in _batched(_grams(problems, damping)[3], eigvalsh)]


def _grams(problems, damping):
    """(forms, the metric side each uses, their roots by id, the Gram matrices) of
    `decompose_many`'s problems: the left form's F W R W^T F^T (L = F^T F), the right
    form's H W^T L W H^T (R = H^T H)."""
    forms, stats = [], []
    for W, kw in problems:
        m, n = W.shape
        forms.append(m <= n)
        stats.append(kw.get("left") if m <= n else kw.get("right"))
    unique = {id(S): S for S in stats if S is not None}
    roots = dict(zip(unique, _triangular_roots(list(unique.values()), damping)))
    grams = []
    for (W, kw), left_form, S in zip(problems, forms, stats):
        W64 = W.to(torch.float64)
        if left_form:
            K = kw.get("right_image")
            K = W64 @ _weigh(kw.get("right"), W64.T) if K is None else K.to(torch.float64)
        else:
            K = kw.get("left_image")
            K = W64.T @ _weigh(kw.get("left"), W64) if K is None else K.to(torch.float64)
        _check_finite(K)
        R = roots.get(id(S)) if S is not None else None
        if R is not None:
            K = _apply(R, _apply(R, K, side="right"))
        grams.append(K)
    return forms, stats, roots, grams


def _batched(grams: list, solve) -> list:
    """solve(stack) on the same-sized matrices of `grams`, at most EIGH_BATCH at a time;
    each result split back per matrix. The list lets go of each matrix as it is stacked,
    so one copy of a batch is alive, not two."""
    out: list = [None] * len(grams)
    by_size: dict[int, list[int]] = {}
    for i, K in enumerate(grams):
        by_size.setdefault(K.shape[-1], []).append(i)
    for same_size in by_size.values():
        for lo in range(0, len(same_size), EIGH_BATCH):
            idx = same_size[lo:lo + EIGH_BATCH]
            K = torch.stack([grams[i] for i in idx])
            for i in idx:
                grams[i] = None
            result = solve(K)
            del K
            for j, i in enumerate(idx):
                out[i] = tuple(t[j] for t in result) if isinstance(result, tuple) else result[j]
    return out


def anchored(W: torch.Tensor, cov: torch.Tensor, cross: torch.Tensor, cov_root: Root,
             left: torch.Tensor | None = None, left_image: torch.Tensor | None = None,
             mix: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The anchored problem as an ordinary one (see the module docstring): (W*, keyword
    arguments of `decompose` / `decompose_many` for W*).

    cov: the compressed stream's input covariance C; cross: X = sum x_c x_d^T (n x n);
    cov_root: a root F of the damped C = F^T F (cholesky_root or psd_root; one Root serves
    every layer reading that input), so (C + lambda I)^{-1} = F^{-1} F^{-T}; left /
    left_image: the output side as for `decompose` (G, or W^T G W for m > n). mix: 1
    anchors to the dense stream, 0 to the compressed stream's own outputs."""
    # The target map is T = (C + lambda I) + mix (X^T - C) (X^T + lambda I at mix 1) and
    # W* = W T (C + lambda I)^{-1}; with C + lambda I = F^T F, W T F^{-1} = W F^T + mix W D
    # F^{-1} (D = X^T - C), so C + lambda I itself (an n^3 product) is never formed.
    W64 = W.to(torch.float64)
    inv_half = cov_root.inv_half
    shift = mix * (cross.to(torch.float64).T - cov.to(torch.float64))     # mix D
    Z = _apply(cov_root, W64, side="right") + W64 @ shift @ inv_half      # Z Z^T = W* F^T F W*^T
    W_star = _apply(cov_root, Z, inverse=True, side="right")
    m, n = W.shape
    if m <= n:
        return W_star, dict(left=left, right=cov_root, right_image=Z @ Z.T)
    M = torch.eye(n, dtype=W64.dtype, device=W64.device) + shift @ inv_half @ inv_half.T
    K = left_image.to(torch.float64) if left_image is not None else W64.T @ _weigh(left, W64)
    return W_star, dict(right=cov_root, left_image=M.T @ K @ M)


def project(W: torch.Tensor, rank: int, left: torch.Tensor | None = None,
            right: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING,
            *, left_image: torch.Tensor | None = None,
            right_image: torch.Tensor | None = None) -> Factors:
    """Best rank-`rank` approximation of W in the metric (left, right), as balanced factors
    in W's dtype. Arguments as in `decompose`."""
    d = decompose(W, left, right, damping, left_image=left_image, right_image=right_image)
    B, A = d.factors(rank)
    return Factors(B=B.to(W.dtype), A=A.to(W.dtype), spectrum=d.spectrum)


def balance(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one term so column i of B and row i of A have equal norms.

    The product is unchanged; balanced factors train better and keep both in range.
    """
    nb, na = B.norm(dim=0), A.norm(dim=1)
    ok = (nb > 0) & (na > 0)
    c = torch.where(ok, (na / torch.where(ok, nb, 1)).sqrt(), torch.ones_like(nb))
    return B * c, A / c[:, None]


def metric_error(W: torch.Tensor, W_approx: torch.Tensor, left: torch.Tensor | None = None,
                 right: torch.Tensor | None = None) -> float:
    """|| L^{1/2} (W - W_approx) R^{1/2} ||_F^2 with undamped statistics: trace(L D R D^T)."""
    D = W.to(torch.float64) - W_approx.to(torch.float64)
    return float((_weigh(left, D) * _weigh(right, D.T).T).sum())


@dataclass
class MetricSVD:
    """The full SVD of M = L^{1/2} W R^{1/2}: W's singular directions in a two-sided
    metric (roots None = identity), for proximal steps and hard truncations during
    training, where the weight changes and every direction is needed."""
    U: torch.Tensor
    S: torch.Tensor              # descending
    Vh: torch.Tensor
    left: Root | None
    right: Root | None

    def weight(self, S: torch.Tensor | None = None) -> torch.Tensor:
        """L^{-1/2} U diag(S) V^T R^{-1/2} (S defaults to the singular values themselves)."""
        M = (self.U * (self.S if S is None else S)) @ self.Vh
        if self.left is not None:
            M = _apply(self.left, M, inverse=True)
        return _apply(self.right, M, inverse=True, side="right") if self.right is not None else M

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced (B, A) of the best rank-`rank` approximation in the metric."""
        B = self.U[:, :rank] * self.S[:rank]
        A = self.Vh[:rank]
        if self.left is not None:
            B = _apply(self.left, B, inverse=True)
        if self.right is not None:
            A = _apply(self.right, A, inverse=True, side="right")
        return balance(B, A)


def metric_svd(W: torch.Tensor, left: Root | None = None, right: Root | None = None,
               dtype: torch.dtype = torch.float64) -> MetricSVD:
    """SVD of L^{1/2} W R^{1/2}; `dtype` float32 halves the cost of the many decompositions
    a training run makes (roots must be in the same dtype)."""
    M = W.to(dtype)
    if left is not None:
        M = _apply(left, M)
    if right is not None:
        M = _apply(right, M, side="right")
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return MetricSVD(U, S, Vh, left, right)


def _soft(s: torch.Tensor, tau: float) -> torch.Tensor:
    """(s - tau)_+: the nuclear norm's prox; every kept direction loses tau."""
    return (s - tau).clamp_min(0)


def _reweighted(s: torch.Tensor, tau: float) -> torch.Tensor:
    """(s - tau^2 / s)_+: one step of the reweighted nuclear norm; zeroes the same
    directions as soft, leaves the large ones nearly untouched."""
    return (s - tau * tau / s.clamp_min(tau)).clamp_min(0) if tau else s.clone()


def _firm(s: torch.Tensor, tau: float) -> torch.Tensor:
    """0 up to tau, 2 (s - tau) up to 2 tau, s above: the prox of the minimax concave
    penalty with gamma = 2, unbiased for every direction above 2 tau."""
    return torch.where(s > 2 * tau, s, 2 * (s - tau).clamp_min(0)) if tau else s.clone()


SHRINKS = {"soft": _soft, "reweighted": _reweighted, "firm": _firm}


def shrink(s: torch.Tensor, tau: float, rule: str = "soft") -> torch.Tensor:
    """New singular values after thresholding `s` at `tau` by one of SHRINKS."""
    return SHRINKS[rule](s, tau)


def singular_value_threshold(W: torch.Tensor, tau: float, left: Root | None = None,
                             right: Root | None = None, dtype: torch.dtype = torch.float64,
                             rule: str = "soft") -> torch.Tensor:
    """The proximal step on W's singular values in the metric's own norm. With the soft
    rule this is the prox of tau * ||L^{1/2} X R^{1/2}||_*:
    argmin_X 1/2 ||L^{1/2} (X - W) R^{1/2}||_F^2 + tau ||L^{1/2} X R^{1/2}||_*
    (plain SVT when both roots are None); the other rules are the proxes of less biased
    penalties. Fine-tuning takes exactly this step (metric_svd, shrink, weight)."""
    d = metric_svd(W, left, right, dtype)
    return d.weight(shrink(d.S, tau, rule)).to(W.dtype)
