"""Singular value thresholding in a metric: the proximal steps of training under a soft
rank constraint (rankwise.train.loop), and the hard truncations between them.

Training changes the weight, so every direction is needed: the full SVD of
M = L^{1/2} W R^{1/2}, not the one-sided Gram matrices the projections use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import Root, apply_root, balance


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
            M = apply_root(self.left, M, inverse=True)
        return apply_root(self.right, M, inverse=True, side="right") if self.right is not None else M

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced (B, A) of the best rank-`rank` approximation in the metric."""
        B = self.U[:, :rank] * self.S[:rank]
        A = self.Vh[:rank]
        if self.left is not None:
            B = apply_root(self.left, B, inverse=True)
        if self.right is not None:
            A = apply_root(self.right, A, inverse=True, side="right")
        return balance(B, A)


def metric_svd(W: torch.Tensor, left: Root | None = None, right: Root | None = None,
               dtype: torch.dtype = torch.float64) -> MetricSVD:
    """SVD of L^{1/2} W R^{1/2}; `dtype` float32 halves the cost of the many decompositions
    a training run makes (roots must be in the same dtype)."""
    M = W.to(dtype)
    if left is not None:
        M = apply_root(left, M)
    if right is not None:
        M = apply_root(right, M, side="right")
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
