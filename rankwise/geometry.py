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
input covariance), and only the root of the side in use is damped. The eigenvalues of the
Gram matrix are S^2, the loss of dropping each direction in the metric: the spectrum rank
allocation spends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_DAMPING = 1e-6


@dataclass
class Factors:
    B: torch.Tensor          # m x r
    A: torch.Tensor          # r x n
    spectrum: torch.Tensor   # min(m, n) squared singular values in the metric, descending


@dataclass
class Root:
    """A symmetric square root of a damped PSD matrix and its inverse (or a diagonal)."""
    half: torch.Tensor
    inv_half: torch.Tensor

    @property
    def diagonal(self) -> bool:
        return self.half.dim() == 1


def psd_root(S: torch.Tensor, damping: float = DEFAULT_DAMPING) -> Root:
    """Square root and inverse square root of a PSD matrix (2-D) or diagonal (1-D).

    Uses a symmetric eigendecomposition, clips negative round-off to zero and adds
    `damping * mean eigenvalue`, so singular or ill-conditioned statistics (dead features,
    fewer tokens than features) give finite roots. An all-zero matrix gives the identity.
    """
    S = S.to(torch.float64)
    if not torch.isfinite(S).all():
        raise ValueError("statistics contain NaN or Inf; the model produced non-finite "
                         "activations or gradients on the calibration data")
    if S.dim() == 1:
        lam = S.clamp_min(0)
    else:
        lam, Q = torch.linalg.eigh((S + S.T) / 2)
        lam = lam.clamp_min(0)
    mean = lam.mean()
    lam = lam + damping * mean if mean > 0 else torch.ones_like(lam)
    if S.dim() == 1:
        return Root(lam.sqrt(), lam.rsqrt())
    return Root((Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T)


class SharedRoots:
    """psd_root, memoised per statistics tensor: a covariance shared by several layers
    (q/k/v, gate/up) is decomposed once. `keep` bounds how many roots stay memoised (the
    most recent; layers sharing a statistic come one after another), None keeps all."""

    def __init__(self, keep: int | None = None):
        self._cache: dict[int, tuple[torch.Tensor, Root]] = {}
        self.keep = keep

    def __call__(self, S: torch.Tensor, damping: float) -> Root:
        hit = self._cache.pop(id(S), None)
        if hit is None or hit[0] is not S:
            hit = (S, psd_root(S, damping))
        self._cache[id(S)] = hit                 # most recent last
        if self.keep is not None and len(self._cache) > self.keep:
            del self._cache[next(iter(self._cache))]
        return hit[1]


def _apply(root: Root, X: torch.Tensor, inverse: bool = False, side: str = "left") -> torch.Tensor:
    R = root.inv_half if inverse else root.half
    if root.diagonal:
        return R[:, None] * X if side == "left" else X * R
    return R @ X if side == "left" else X @ R


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
        """Balanced float64 (B, A) of the best rank-`rank` approximation in the metric."""
        k = self.spectrum.numel()
        if not 1 <= rank <= k:
            raise ValueError(f"rank must be in [1, {k}] for a {tuple(self.W.shape)} weight, got {rank}")
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

    def to(self, device) -> "Decomposition":
        root = None if self.root is None else \
            Root(self.root.half.to(device), self.root.inv_half.to(device))
        return Decomposition(self.W.to(device), self.basis.to(device), self.spectrum.to(device),
                             root, self.left_form)


def decompose(W: torch.Tensor, left: torch.Tensor | None = None,
              right: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING,
              root=psd_root, *, left_image: torch.Tensor | None = None,
              right_image: torch.Tensor | None = None) -> Decomposition:
    """Singular directions of W in the metric (left, right).

    left: output-side statistic L (m x m matrix, m-vector diagonal, or None = identity);
    right: input-side statistic R (n x n matrix or None = identity).
    right_image = W R W^T and left_image = W^T L W may be given instead of the larger side's
    statistic: for m <= n only (left, right_image) are used, for m > n only
    (right, left_image). `root` computes a Root from (statistic, damping); pass a memoised
    one to share work between layers.
    """
    m, n = W.shape
    W64 = W.to(torch.float64)
    left_form = m <= n
    if left_form:
        K = right_image if right_image is not None else W64 @ _weigh(right, W64.T)
        stat = left
    else:
        K = left_image if left_image is not None else W64.T @ _weigh(left, W64)
        stat = right
    R = root(stat, damping) if stat is not None else None
    K = K.to(torch.float64)
    if R is not None:          # L^{1/2} W R W^T L^{1/2}  or  R^{1/2} W^T L W R^{1/2}
        K = _apply(R, _apply(R, K, side="right"))
    lam, Q = torch.linalg.eigh((K + K.T) / 2)
    return Decomposition(W=W, basis=Q.flip(1), spectrum=lam.flip(0).clamp_min(0), root=R,
                         left_form=left_form)


def project(W: torch.Tensor, rank: int, left: torch.Tensor | None = None,
            right: torch.Tensor | None = None, damping: float = DEFAULT_DAMPING,
            root=psd_root, *, left_image: torch.Tensor | None = None,
            right_image: torch.Tensor | None = None) -> Factors:
    """Best rank-`rank` approximation of W in the metric (left, right), as balanced factors
    in W's dtype. Arguments as in `decompose`."""
    d = decompose(W, left, right, damping, root, left_image=left_image, right_image=right_image)
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
