"""Deep linear networks (DLN) and their compressed form (C-DLN) on low-rank recovery.

A depth-L DLN represents a d x d matrix as the product W_L ... W_1. Started from a small
orthogonal initialisation (scale eps) and trained by gradient descent on a rank-r
recovery problem, every W_l moves only inside a subspace of dimension about 2r
(arXiv 2311.05061): the wide network spends L d^2 parameters on a problem that lives in
O(d r). The C-DLN keeps just that subspace from the start: first layer r_hat x d, L-2
middle layers r_hat x r_hat, last d x r_hat, with

  * spectral init: the outer layers are eps times the top-r_hat singular vectors of a
    surrogate of the target (the observations mapped back to a d x d matrix), the middle
    layers eps * I, so the end-to-end map starts at eps^L U_hat V_hat^T, inside the
    surrogate's top singular subspaces (the wide DLN has to find them first);
  * two timescales: the outer layers (which carry the subspaces) learn alpha times faster.

Gradients of the product are written out by hand (one sweep of matmuls), identical for
both networks, so wall-clock comparisons measure the shapes and nothing else.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..errors import RankwiseError

PROBLEMS = ("full", "completion", "sensing")


@dataclass
class Problem:
    """A rank-r d x d recovery problem. `gradient(W)` is the gradient of the loss at the
    end-to-end matrix W; every loss is scaled so that its expected Hessian is the identity,
    so one learning rate fits all three problems."""
    name: str
    target: torch.Tensor            # M*, d x d, rank r
    rank: int
    surrogate: torch.Tensor         # the observations mapped back to a d x d matrix
    mask: torch.Tensor | None = None        # completion: observed entries
    fraction: float = 1.0                   # completion: observed fraction p
    operator: torch.Tensor | None = None    # sensing: (measurements, d*d), entries N(0, 1/m)
    observed: torch.Tensor | None = None    # observations (noisy entries or measurements)

    @property
    def d(self) -> int:
        return self.target.shape[0]

    def gradient(self, W: torch.Tensor) -> torch.Tensor:
        if self.name == "full":
            return W - self.observed
        if self.name == "completion":
            return self.mask * (W - self.observed) / self.fraction
        residual = self.operator @ W.reshape(-1) - self.observed
        return (self.operator.T @ residual).view_as(W)

    def loss(self, W: torch.Tensor) -> float:
        if self.name == "sensing":
            return 0.5 * float((self.operator @ W.reshape(-1) - self.observed).square().sum())
        R = W - self.observed
        if self.name == "completion":
            R = self.mask * R / math.sqrt(self.fraction)
        return 0.5 * float(R.square().sum())

    def relative_error(self, W: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(W - self.target) / torch.linalg.matrix_norm(self.target))


def make_problem(name: str, d: int = 100, rank: int = 5, *, measurements: int | None = None,
                 observed_fraction: float = 0.3, noise: float = 0.0, seed: int = 0,
                 dtype=torch.float64) -> Problem:
    """A random rank-`rank` target M* = U diag(s) V^T with orthonormal U, V and singular
    values evenly spaced in [0.5, 1], observed in full, on a random mask of
    `observed_fraction` of the entries (completion), or through `measurements` Gaussian
    linear measurements (sensing; default 3 d r). `noise` is the standard deviation of
    the Gaussian noise added to each observation, relative to the RMS of the observations
    of M*."""
    if name not in PROBLEMS:
        raise RankwiseError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    if not 1 <= rank <= d:
        raise RankwiseError(f"rank must be in [1, d={d}], got {rank}")
    if not 0 < observed_fraction <= 1:
        raise RankwiseError(f"observed fraction must be in (0, 1], got {observed_fraction}")
    if noise < 0:
        raise RankwiseError(f"noise must be non-negative, got {noise}")
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=dtype))[0]
    V = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=dtype))[0]
    s = torch.linspace(1.0, 0.5, rank, dtype=dtype)
    M = (U * s) @ V.T
    p = Problem(name=name, target=M, rank=rank, surrogate=M)
    if name == "full":
        p.observed = M + noise * M.square().mean().sqrt() * torch.randn(d, d, generator=g, dtype=dtype)
        p.surrogate = p.observed
    elif name == "completion":
        p.mask = (torch.rand(d, d, generator=g, dtype=dtype) < observed_fraction).to(dtype)
        p.fraction = observed_fraction
        scale = noise * M.square().mean().sqrt()
        p.observed = p.mask * (M + scale * torch.randn(d, d, generator=g, dtype=dtype))
        p.surrogate = p.observed / observed_fraction
    else:
        m = measurements or 3 * d * rank
        if m < 1:
            raise RankwiseError(f"sensing needs at least one measurement, got {m}")
        A = torch.randn(m, d * d, generator=g, dtype=dtype) / math.sqrt(m)
        y = A @ M.reshape(-1)
        p.operator = A
        p.observed = y + noise * y.square().mean().sqrt() * torch.randn(m, generator=g, dtype=dtype)
        p.surrogate = (A.T @ p.observed).view(d, d)
    return p


# ---------------------------------------------------------------- networks

def dln_params(d: int, depth: int) -> int:
    return depth * d * d


def cdln_params(d: int, depth: int, width: int) -> int:
    return 2 * d * width + (depth - 2) * width * width


def orthogonal_init(d: int, depth: int, eps: float, seed: int = 0,
                    dtype=torch.float64) -> list[torch.Tensor]:
    """The wide DLN: `depth` d x d factors, each eps times a random orthogonal matrix."""
    _check_depth(depth)
    g = torch.Generator().manual_seed(seed)
    return [eps * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))[0]
            for _ in range(depth)]


def spectral_init(surrogate: torch.Tensor, depth: int, width: int,
                  eps: float) -> list[torch.Tensor]:
    """The C-DLN: W_1 = eps V_hat^T (width x d), W_l = eps I (middle), W_L = eps U_hat
    (d x width), U_hat, V_hat the top-`width` singular vectors of the surrogate. The
    end-to-end map eps^L U_hat V_hat^T spans exactly the surrogate's top-`width` singular
    subspaces."""
    _check_depth(depth)
    d = surrogate.shape[0]
    if not 1 <= width <= d:
        raise RankwiseError(f"the compressed width must be in [1, d={d}], got {width}")
    U, _, Vh = torch.linalg.svd(surrogate)
    middle = [eps * torch.eye(width, dtype=surrogate.dtype) for _ in range(depth - 2)]
    return [eps * Vh[:width].clone(), *middle, eps * U[:, :width].clone()]


def _check_depth(depth: int) -> None:
    if depth < 2:
        raise RankwiseError(f"a deep linear network needs at least 2 layers, got {depth}")


def end_to_end(factors: list[torch.Tensor]) -> torch.Tensor:
    W = factors[0]
    for F in factors[1:]:
        W = F @ W
    return W


# ---------------------------------------------------------------- training

@dataclass
class Trace:
    """What one training run measured: errors every `every` iterations, and when."""
    network: str
    params: int
    iterations: list[int] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)   # training time, logging excluded
    reached: int | None = None          # first iteration with error <= tol
    reached_seconds: float | None = None

    @property
    def final_error(self) -> float:
        return self.errors[-1]


def train(problem: Problem, factors: list[torch.Tensor], lr: float = 0.2, alpha: float = 1.0,
          iterations: int = 20000, tol: float = 1e-3, every: int = 10, network: str = "",
          snapshot=None, stop_at_tol: bool = True) -> Trace:
    """Gradient descent on the factors (updated in place) of the product's loss.

    Outer factors (first and last) take step alpha * lr, middle ones lr. The relative error
    of the end-to-end map is recorded every `every` iterations (and at the end) with the
    training time so far; stops once it is <= tol if `stop_at_tol`. `snapshot(it, factors)`
    is called at every record (outside the timed part).
    """
    if lr <= 0 or alpha <= 0:
        raise RankwiseError(f"learning rate and alpha must be positive, got {lr} and {alpha}")
    L = len(factors)
    rates = [alpha * lr if l in (0, L - 1) else lr for l in range(L)]
    trace = Trace(network=network, params=sum(F.numel() for F in factors))
    elapsed = 0.0
    for it in range(iterations + 1):
        t0 = time.perf_counter()
        prefix = [factors[0]]                # prefix[l] = W_{l+1} ... W_1 (0-based)
        for F in factors[1:]:
            prefix.append(F @ prefix[-1])
        W = prefix[-1]
        if it % every == 0 or it == iterations:
            elapsed += time.perf_counter() - t0
            error = problem.relative_error(W)
            if not math.isfinite(error):
                raise RankwiseError(f"{network or 'training'} diverged at iteration {it}; "
                                    f"lower the learning rate (lr {lr}, alpha {alpha})")
            trace.iterations.append(it)
            trace.errors.append(error)
            trace.seconds.append(elapsed)
            if snapshot is not None:
                snapshot(it, factors)
            if error <= tol and trace.reached is None:
                trace.reached, trace.reached_seconds = it, elapsed
                if stop_at_tol:
                    break
            if it == iterations:
                break
            t0 = time.perf_counter()
        back = problem.gradient(W)           # dLoss / d(W_L ... W_{l+1})-output, walking down
        for l in range(L - 1, -1, -1):
            grad = back @ prefix[l - 1].T if l > 0 else back
            if l > 0:
                back = factors[l].T @ back
            factors[l].sub_(rates[l] * grad)
        elapsed += time.perf_counter() - t0
    return trace


def run_pair(problem: Problem, depth: int = 3, width: int = 10, eps: float = 1e-3,
             lr: float = 0.2, alpha: float = 4.0, iterations: int = 20000, tol: float = 1e-3,
             every: int = 10, seed: int = 0, stop_at_tol: bool = True) -> tuple[Trace, Trace]:
    """The wide DLN (orthogonal init, one learning rate) and the C-DLN (spectral init,
    outer layers alpha times faster) on the same problem, same base learning rate."""
    wide = train(problem, orthogonal_init(problem.d, depth, eps, seed, problem.target.dtype),
                 lr=lr, alpha=1.0, iterations=iterations, tol=tol, every=every,
                 network="DLN", stop_at_tol=stop_at_tol)
    compressed = train(problem, spectral_init(problem.surrogate, depth, width, eps), lr=lr,
                       alpha=alpha, iterations=iterations, tol=tol, every=every,
                       network="C-DLN", stop_at_tol=stop_at_tol)
    return wide, compressed


# ---------------------------------------------------------------- the invariant subspace

@dataclass
class SubspaceRecord:
    """The wide DLN's updates W_l(t) - W_l(0), recorded along training."""
    iterations: list[int] = field(default_factory=list)
    spectra: list[list[torch.Tensor]] = field(default_factory=list)   # [record][layer]
    angle_right: list[float] = field(default_factory=list)   # first layer vs V*, degrees
    angle_left: list[float] = field(default_factory=list)    # last layer vs U*, degrees

    def effective_rank(self, rel: float = 1e-3) -> list[list[int]]:
        """Singular values of each update above rel * its largest, per record and layer."""
        return [[int((s > rel * s[0]).sum()) if s[0] > 0 else 0 for s in layers]
                for layers in self.spectra]


def largest_principal_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle (degrees) between the column spans of A and B."""
    Qa, Qb = torch.linalg.qr(A)[0], torch.linalg.qr(B)[0]
    cos = torch.linalg.svdvals(Qa.T @ Qb).clamp(0, 1)
    return math.degrees(math.acos(float(cos.min())))


def track_subspace(problem: Problem, depth: int = 3, eps: float = 1e-3, lr: float = 0.2,
                   iterations: int = 20000, tol: float = 1e-3, every: int = 100,
                   seed: int = 0) -> tuple[Trace, SubspaceRecord]:
    """Train the wide DLN and record, every `every` iterations, the singular values of
    every layer's update and the largest principal angle between the top-r singular
    subspaces of the first (last) layer's update and the target's right (left) ones."""
    factors = orthogonal_init(problem.d, depth, eps, seed, problem.target.dtype)
    start = [F.clone() for F in factors]
    U, _, Vh = torch.linalg.svd(problem.target)
    r = problem.rank
    record = SubspaceRecord()

    def snapshot(it, current):
        deltas = [F - F0 for F, F0 in zip(current, start)]
        record.iterations.append(it)
        record.spectra.append([torch.linalg.svdvals(D) for D in deltas])
        if float(deltas[0].abs().max()) > 0:
            V1 = torch.linalg.svd(deltas[0])[2][:r].T
            UL = torch.linalg.svd(deltas[-1])[0][:, :r]
            record.angle_right.append(largest_principal_angle(V1, Vh[:r].T))
            record.angle_left.append(largest_principal_angle(UL, U[:, :r]))
        else:
            record.angle_right.append(90.0)
            record.angle_left.append(90.0)

    trace = train(problem, factors, lr=lr, iterations=iterations, tol=tol, every=every,
                  network="DLN", snapshot=snapshot)
    return trace, record


def table(rows: list[tuple[str, Trace]], tol: float) -> str:
    """A text table of (problem, trace) rows; ratios to the preceding wide DLN row."""
    lines = [f"{'problem':24s} {'network':8s} {'params':>8s} {'iters to ' + format(tol, 'g'):>14s} "
             f"{'seconds':>9s} {'x DLN time':>10s} {'x DLN iters':>11s} {'final error':>12s}"]
    base = None
    for problem, t in rows:
        if t.network == "DLN":
            base = t
        reached = t.reached is not None
        ratio_s = ratio_i = "-"
        if reached and base is not None and base.reached and t is not base:
            ratio_s = f"{t.reached_seconds / base.reached_seconds:.3f}"
            ratio_i = f"{t.reached / base.reached:.3f}"
        iters = str(t.reached) if reached else f">{t.iterations[-1]}"
        secs = t.reached_seconds if reached else t.seconds[-1]
        lines.append(f"{problem:24s} {t.network:8s} {t.params:8d} {iters:>14s} {secs:9.2f} "
                     f"{ratio_s:>10s} {ratio_i:>11s} {t.final_error:12.2e}")
    return "\n".join(lines)


def dominated_records(wide: Trace, compressed: Trace) -> list[tuple[int, float, float]]:
    """Logged iterations (both runs alive) where the C-DLN's error exceeds the wide DLN's."""
    return [(i, a, b) for i, a, b in zip(wide.iterations, wide.errors, compressed.errors) if b > a]
