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

With M = L^{1/2} W R^{1/2} = U S V^T, the optimum is W_r = L^{-1/2} U_r U_r^T L^{1/2} W:
only the *left* root is ever inverted, and not at all when left = I, so a singular input
covariance never enters an inverse. The squared singular values S^2 are the loss of
dropping each direction in that metric: the spectrum that rank allocation spends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("svd", "whiten", "fisher", "kfac")
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


def _left(root: Root | None, X: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    if root is None:
        return X
    R = root.inv_half if inverse else root.half
    return R[:, None] * X if root.diagonal else R @ X


def weighted(W: torch.Tensor, left: Root | None = None, right: Root | None = None) -> torch.Tensor:
    """M = L^{1/2} W R^{1/2}: the weight seen in the metric."""
    M = _left(left, W.to(torch.float64))
    if right is not None:
        M = M * right.half if right.diagonal else M @ right.half
    return M


def project(W: torch.Tensor, rank: int, left: Root | None = None,
            right: Root | None = None) -> Factors:
    """Best rank-`rank` approximation of W in the metric (left, right), as balanced factors."""
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m} x {n} weight, got {rank}")
    W64 = W.to(torch.float64)
    M = weighted(W64, left, right)
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    Ur = U[:, :rank]
    B = _left(left, Ur, inverse=True)
    A = Ur.T @ _left(left, W64)
    B, A = balance(B, A)
    return Factors(B=B.to(W.dtype), A=A.to(W.dtype), spectrum=S.square())


def spectrum(W: torch.Tensor, left: Root | None = None, right: Root | None = None) -> torch.Tensor:
    """Loss of dropping each singular direction in the metric (squared singular values)."""
    return torch.linalg.svdvals(weighted(W, left, right)).square()


def balance(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one term so column i of B and row i of A have equal norms.

    The product is unchanged; balanced factors train better and keep both in range.
    """
    nb, na = B.norm(dim=0), A.norm(dim=1)
    ok = (nb > 0) & (na > 0)
    c = torch.where(ok, (na / torch.where(ok, nb, 1)).sqrt(), torch.ones_like(nb))
    return B * c, A / c[:, None]


def metric_error(W: torch.Tensor, W_approx: torch.Tensor, left: Root | None = None,
                 right: Root | None = None) -> float:
    """|| L^{1/2} (W - W_approx) R^{1/2} ||_F^2, the quantity `project` minimises."""
    return float(weighted(W.to(torch.float64) - W_approx.to(torch.float64), left, right)
                 .square().sum())


def metric_roots(metric: str, input_cov: torch.Tensor | None, grad_cov: torch.Tensor | None,
                 damping: float = DEFAULT_DAMPING, root=psd_root) -> tuple[Root | None, Root | None]:
    """(left, right) roots of one of METRICS from a layer's statistics.

    `root` computes a Root from (matrix, damping); pass a memoised one to share work."""
    if metric == "svd":
        return None, None
    if metric == "whiten":
        return None, root(_need(input_cov, metric, "input covariance"), damping)
    if metric == "fisher":
        G = _need(grad_cov, metric, "output-gradient statistics")
        return root(G.diagonal() if G.dim() == 2 else G, damping), None
    if metric == "kfac":
        return (root(_need(grad_cov, metric, "output-gradient covariance"), damping),
                root(_need(input_cov, metric, "input covariance"), damping))
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def _need(t: torch.Tensor | None, metric: str, what: str) -> torch.Tensor:
    if t is None:
        raise ValueError(f"metric {metric!r} needs the layer's {what}")
    return t
