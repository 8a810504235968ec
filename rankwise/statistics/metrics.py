"""The registry of projection metrics: what each one needs and how its weights are formed.

One record per metric serves config validation, statistics collection (which sides to
accumulate), projection (the keyword arguments of geometry.decompose) and fine-tuning (the
roots of both sides for proximal steps). The mathematics of each is in geometry's docstring:

  svd     left = I,        right = I          Frobenius; the baseline
  whiten  left = I,        right = C          input covariance (SVD-LLM / ASVD)
  fisher  left = diag(G),  right = I          output-wise Fisher weights (FWSVD)
  kfac    left = G,        right = C          Kronecker-factored Fisher (the KL's Hessian)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RankwiseError
from ..geometry import Root, SharedRoots


@dataclass(frozen=True)
class Metric:
    name: str
    inputs: bool              # uses the input covariance C (or W C W^T)
    gradients: str | None     # output-gradient side: None, "diag" (diag G) or "full" (G)
    help: str

    @property
    def needs_calibration(self) -> bool:
        return self.inputs or self.gradients is not None

    def statistics(self, shape: tuple[int, int], input_cov=None, output_cov=None,
                   grad_cov=None, input_grad_cov=None, grad_diag=None) -> dict:
        """Keyword arguments of geometry.decompose from a layer's statistics:
        C = input_cov, W C W^T = output_cov, G = grad_cov, W^T G W = input_grad_cov,
        diag(G) = grad_diag. Only what the layer's smaller side needs must be present."""
        small_left = shape[0] <= shape[1]
        out = {}
        if self.inputs:
            if input_cov is None and not (small_left and output_cov is not None):
                raise RankwiseError(f"metric {self.name!r} needs the layer's input covariance")
            out.update(right=input_cov, right_image=output_cov)
        out.update(self.output_side(shape, grad_cov, input_grad_cov, grad_diag))
        return out

    def output_side(self, shape: tuple[int, int], grad_cov=None, input_grad_cov=None,
                    grad_diag=None) -> dict:
        """The output side alone (left = G or diag G, left_image = W^T G W), as
        geometry.decompose and geometry.anchored take it; empty without gradients."""
        small_left = shape[0] <= shape[1]
        out = {}
        if self.gradients == "diag":
            diag = grad_diag if grad_diag is not None else \
                (grad_cov.diagonal() if grad_cov is not None else None)
            if diag is None:
                raise RankwiseError(f"metric {self.name!r} needs the layer's diagonal Fisher")
            out.update(left=diag)
        elif self.gradients == "full":
            if small_left and grad_cov is None:
                raise RankwiseError(f"metric {self.name!r} needs the layer's output-gradient covariance")
            if not small_left and grad_cov is None and input_grad_cov is None:
                raise RankwiseError(f"metric {self.name!r} needs the layer's gradient covariance")
            out.update(left=grad_cov, left_image=input_grad_cov)
        return out

    def roots(self, stats, damping: float, shared: SharedRoots,
              dtype: torch.dtype = torch.float32) -> tuple[Root | None, Root | None]:
        """(left, right) roots of both sides, as a changing weight needs (fine-tuning);
        `stats` must hold both sides (stats.collect(..., both_sides=True))."""
        left = right = None
        if self.inputs:
            right = shared(stats.input_cov, damping).to(dtype)
        if self.gradients == "full":
            left = shared(stats.grad_cov, damping).to(dtype)
        elif self.gradients == "diag":
            left = shared(stats.grad_diag, damping).to(dtype)
        return left, right



METRICS = {m.name: m for m in (
    Metric("svd", inputs=False, gradients=None,
           help="Frobenius norm, plain truncated SVD, no statistics; the baseline"),
    Metric("whiten", inputs=True, gradients=None,
           help="input covariance C: what the layer's outputs lose on the calibration inputs"),
    Metric("fisher", inputs=False, gradients="diag",
           help="diagonal Fisher on the outputs, output-wise gradient weights"),
    Metric("kfac", inputs=True, gradients="full",
           help="Kronecker-factored Fisher G x C: the second-order KL to the dense model"),
)}


def get(name: str) -> Metric:
    if name not in METRICS:
        raise RankwiseError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]
