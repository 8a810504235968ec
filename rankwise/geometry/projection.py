"""Projections of a weight onto the rank-r set in a metric, and the anchored problem.

With M = L^{1/2} W R^{1/2} = U S V^T the optimum is W_r = L^{-1/2} U_r U_r^T L^{1/2} W
= W R^{1/2} V_r V_r^T R^{-1/2}. Only one side ever needs a root: the left form takes U from
the m x m Gram matrix L^{1/2} W R W^T L^{1/2} (R enters as is), the right form takes V from
the n x n Gram R^{1/2} W^T L W R^{1/2} (L enters as is). We use the smaller side, so no
eigendecomposition of the larger covariance is ever computed (e.g. down_proj's 1536-wide
input covariance), and only the root of the side in use is damped. Any square root F
with L = F^T F serves (||L^{1/2} X||_F = ||F X||_F, and F K F^T has the eigenvalues of
L^{1/2} K L^{1/2}), so the roots here are Cholesky factors (rankwise.geometry.roots). The
eigenvalues of the Gram matrix are S^2, the loss of dropping each direction in the metric:
the spectrum rank allocation spends.

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

from dataclasses import dataclass

import torch

from ..errors import RankwiseError
from . import solvers
from .roots import DEFAULT_DAMPING, Root, check_finite, triangular_roots


@dataclass
class Factors:
    B: torch.Tensor          # m x r
    A: torch.Tensor          # r x n
    spectrum: torch.Tensor   # min(m, n) squared singular values in the metric, descending


def apply_root(root: Root, X: torch.Tensor, inverse: bool = False, side: str = "left"
               ) -> torch.Tensor:
    """F X (side left) or X F^T (side right), F the root or its inverse."""
    R = root.inv_half if inverse else root.half
    if root.diagonal:
        return R[:, None] * X if side == "left" else X * R
    return R @ X if side == "left" else X @ R.T


def weigh(S: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor:
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
            B = apply_root(R, Q, inverse=True) if R is not None else Q
            A = Q.T @ (apply_root(R, W) if R is not None else W)
        else:                  # W_r = W R^{1/2} V_r V_r^T R^{-1/2}
            B = (apply_root(R, W, side="right") if R is not None else W) @ Q
            A = apply_root(R, Q.T, inverse=True, side="right") if R is not None else Q.T
        return balance(B, A)

    @property
    def damping(self) -> float | None:
        """The damping the metric's root took (None: no root)."""
        return self.root.damping if self.root is not None else None


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
    forms, roots, grams = _grams(problems, damping)
    solved = solvers.batched(grams, solvers.eigh)
    return [Decomposition(W=W, basis=Q.flip(1), spectrum=lam.flip(0).clamp_min(0),
                          left_form=left_form, root=root)
            for (W, _), left_form, root, (lam, Q) in zip(problems, forms, roots, solved)]


@dataclass
class Spectrum:
    """A weight's loss spectrum in a metric without its basis: what an allocation reads."""
    values: torch.Tensor            # k = min(m, n) squared singular values, descending
    damping: float | None           # what the metric's root took (None: no root)


def spectra_many(problems: list[tuple[torch.Tensor, dict]],
                 damping: float = DEFAULT_DAMPING) -> list[Spectrum]:
    """The spectra of `decompose_many`'s decompositions without their bases. Eigenvalues
    alone are a fraction of an eigendecomposition's work (no eigenvectors accumulated; see
    solvers.eigvalsh)."""
    _, roots, grams = _grams(problems, damping)
    return [Spectrum(lam.flip(0).clamp_min(0), root.damping if root is not None else None)
            for lam, root in zip(solvers.batched(grams, solvers.eigvalsh), roots)]


def metric_totals(problems: list[tuple[torch.Tensor, dict]],
                  damping: float = DEFAULT_DAMPING) -> list[float]:
    """Each problem's whole squared norm in its metric, rooted and damped exactly as
    `decompose_many` roots and damps it: the sum of its spectrum, which a truncation to
    rank 0 costs (what prices of full-rank errors are compared with truncations in)."""
    return [float(torch.diagonal(K).sum()) for K in _grams(problems, damping)[2]]


def _grams(problems, damping):
    """(forms, the root of the metric side each uses, the Gram matrices) of
    `decompose_many`'s problems: the left form's F W R W^T F^T (L = F^T F), the right
    form's H W^T L W H^T (R = H^T H)."""
    forms, stats = [], []
    for W, kw in problems:
        m, n = W.shape
        forms.append(m <= n)
        stats.append(kw.get("left") if m <= n else kw.get("right"))
    unique = {id(S): S for S in stats if S is not None}
    by_id = dict(zip(unique, triangular_roots(list(unique.values()), damping)))
    roots = [by_id[id(S)] if S is not None else None for S in stats]
    grams = []
    for (W, kw), left_form, R in zip(problems, forms, roots):
        W64 = W.to(torch.float64)
        if left_form:
            K = kw.get("right_image")
            K = W64 @ weigh(kw.get("right"), W64.T) if K is None else K.to(torch.float64)
        else:
            K = kw.get("left_image")
            K = W64.T @ weigh(kw.get("left"), W64) if K is None else K.to(torch.float64)
        check_finite(K)
        if R is not None:
            K = apply_root(R, apply_root(R, K, side="right"))
        grams.append(K)
    return forms, roots, grams


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
    W_star, Z, shift = _target(W, cov, cross, cov_root, mix)
    m, n = W.shape
    if m <= n:
        return W_star, dict(left=left, right=cov_root, right_image=Z @ Z.T)
    W64 = W.to(torch.float64)
    inv_half = cov_root.inv_half
    M = torch.eye(n, dtype=W64.dtype, device=W64.device) + shift @ inv_half @ inv_half.T
    K = left_image.to(torch.float64) if left_image is not None else W64.T @ weigh(left, W64)
    return W_star, dict(right=cov_root, left_image=M.T @ K @ M)


def anchored_target(W: torch.Tensor, cov: torch.Tensor, cross: torch.Tensor, cov_root: Root,
                    mix: float = 1.0) -> torch.Tensor:
    """W* alone (float64): the full-rank weight that, fed the compressed stream, gives the
    outputs the anchoring asks for; what a weight rounded on the compressed stream is
    rounded from."""
    return _target(W, cov, cross, cov_root, mix)[0]


def residual_problem(E: torch.Tensor, root: Root, left: torch.Tensor | None) -> dict:
    """Keyword arguments of `decompose_many` for an error E (m x n) in the metric (left, the
    damped input statistic whose root is `root`): what a low-rank correction of E solves,
    in the small form `decompose` takes (E R E^T through the root for m <= n, E^T L E for
    m > n)."""
    m, n = E.shape
    E64 = E.to(torch.float64)
    if m <= n:
        Z = apply_root(root, E64, side="right")
        return dict(left=left, right=root, right_image=Z @ Z.T)
    return dict(right=root, left_image=E64.T @ weigh(left, E64))


def _target(W, cov, cross, cov_root, mix):
    """(W*, Z = W* F^T, mix D): the anchored target and what its small forms are built of."""
    # The target map is T = (C + lambda I) + mix (X^T - C) (X^T + lambda I at mix 1) and
    # W* = W T (C + lambda I)^{-1}; with C + lambda I = F^T F, W T F^{-1} = W F^T + mix W D
    # F^{-1} (D = X^T - C), so C + lambda I itself (an n^3 product) is never formed.
    W64 = W.to(torch.float64)
    inv_half = cov_root.inv_half
    shift = mix * (cross.to(torch.float64).T - cov.to(torch.float64))     # mix D
    Z = apply_root(cov_root, W64, side="right") + W64 @ shift @ inv_half  # Z Z^T = W* F^T F W*^T
    W_star = apply_root(cov_root, Z, inverse=True, side="right")
    return W_star, Z, shift


def project(W: torch.Tensor, rank: int, left: torch.Tensor | None = None,
            right: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING,
            *, left_image: torch.Tensor | None = None,
            right_image: torch.Tensor | None = None) -> Factors:
    """Best rank-`rank` approximation of W in the metric (left, right), as balanced factors
    in W's dtype. Arguments as in `decompose`."""
    d = decompose(W, left, right, damping, left_image=left_image, right_image=right_image)
    B, A = d.factors(rank)
    return Factors(B=B.to(W.dtype), A=A.to(W.dtype), spectrum=d.spectrum)


def truncation_prices(d: Decomposition, left: torch.Tensor | None = None,
                      right: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING
                      ) -> torch.Tensor:
    """prices[r], r = 0 .. k: the squared norm in the metric (left, right) of the error
    W - B_r A_r of d's rank-r approximation, for every r at once (prices[k] = 0).

    With all k terms W = sum_i b_i a_i^T, so the error at rank r is sum_{i >= r} b_i a_i^T
    and its price sum_{i, j >= r} (b_i^T L b_j)(a_i^T R a_j): the lower-right corner sums
    of M = (B^T L B) o (A R A^T). The side d's root damps is damped here the way
    `decompose_many` damps it, so in d's own statistics M is diagonal and the prices are
    the tail sums of its spectrum. In statistics of tokens the decomposition never saw
    they are what the truncation costs out of sample, which its own spectrum understates
    (the directions it drops were chosen as the ones those same tokens hardly use)."""
    k = d.spectrum.numel()
    B, A = d.factors(k)
    side = left if d.left_form else right
    root = triangular_roots([side], damping)[0] if side is not None else None
    if d.left_form:
        FB = apply_root(root, B) if root is not None else B
        M = (FB.T @ FB) * (A @ weigh(right, A.T))
    else:
        FA = apply_root(root, A.T) if root is not None else A.T
        M = (B.T @ weigh(left, B)) * (FA.T @ FA)
    corners = M.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)
    return torch.cat([corners.diagonal(), M.new_zeros(1)])


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
    return float((weigh(left, D) * weigh(right, D.T).T).sum())


