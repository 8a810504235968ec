"""The mathematical heart: project a weight onto the rank-r set in a chosen metric.

Pure functions on tensors: no hooks, no models, no I/O. Solvers run in float32 where a
float64 check accepts the answer and in float64 otherwise (geometry.solvers).

A metric is a pair (left, right) of positive semi-definite weights on the output and input
side of `W` (m x n); the projection solves

    min_{rank(W_r) <= r}  || L^{1/2} (W - W_r) R^{1/2} ||_F

  svd     left = I,        right = I          (Frobenius; baseline)
  whiten  left = I,        right = C = sum x x^T            (SVD-LLM / ASVD)
  fisher  left = diag(G),  right = I          (FWSVD: output-wise Fisher weights)
  kfac    left = G = sum g g^T,  right = C    (Kronecker-factored Fisher; the KL's
                                                second-order term)

The parts, one subject each:
  solvers      checked eigendecompositions and eigenvalues, and their count
  roots        square roots of damped statistics (Cholesky; symmetric where training
               needs it), and the damping each really took
  projection   decompositions, spectra, factors of any rank, the anchored problem,
               errors in a metric
Training's singular value thresholding builds on these in rankwise.train.svt.
"""
from .projection import (Decomposition, Factors, Spectrum, anchored, anchored_target,
                         apply_root, balance, decompose, decompose_many, metric_error,
                         metric_totals, project, residual_problem, spectra_many,
                         truncation_prices, weigh)
from .roots import (DAMPING_FLOOR, DEFAULT_DAMPING, ROUNDOFF_DAMPING, Root, SharedRoots,
                    cholesky_root, damping_tries, psd_root, raised, triangular_roots)
from .solvers import EIGH_BATCH, EIGH_COUNT, EIGH_RTOL, EighCount, eigh, eigvalsh

__all__ = ["DAMPING_FLOOR", "DEFAULT_DAMPING", "Decomposition", "EIGH_BATCH", "EIGH_COUNT",
           "EIGH_RTOL", "EighCount", "Factors", "ROUNDOFF_DAMPING", "Root", "SharedRoots",
           "Spectrum", "anchored", "anchored_target", "apply_root", "balance", "cholesky_root", "damping_tries",
           "decompose", "decompose_many", "eigh", "eigvalsh", "metric_error", "metric_totals", "truncation_prices",
           "project",
           "psd_root", "raised", "residual_problem", "spectra_many", "triangular_roots", "weigh"]
