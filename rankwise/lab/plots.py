"""Pictures of the deep linear network experiments: recovery curves, where the wide
network's updates live, and the alpha / width ablation."""
from __future__ import annotations

from pathlib import Path

from ..evaluation.plots import pyplot, save_figure


def recovery_curves(runs: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Relative error against iteration (top) and training seconds (bottom), one column per
    problem; `runs` maps a problem name to its traces (rankwise.lab.dln.Trace)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 6.4), squeeze=False)
    for col, (problem, traces) in enumerate(runs.items()):
        for trace in traces:
            label = f"{trace.network} ({trace.params:,} params)"
            axes[0, col].semilogy(trace.iterations, trace.errors, label=label)
            axes[1, col].semilogy(trace.seconds, trace.errors, label=label)
        axes[0, col].set_title(problem, fontsize=10)
        for ax, xlabel in zip(axes[:, col], ("iteration", "training seconds")):
            _label(ax, xlabel, "||W - M*||_F / ||M*||_F")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def subspace_figure(record, rank: int, path: str | Path, title: str = "") -> Path:
    """The wide DLN's updates W_l(t) - W_l(0): their singular values at the end of
    training (left), and the largest principal angle between their top-r singular
    subspaces and the target's (right)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for l, s in enumerate(record.spectra[-1]):
        s = s / s[0] if s[0] > 0 else s
        left.semilogy(range(1, len(s) + 1), s.clamp_min(1e-16), ".-", ms=3, label=f"layer {l + 1}")
    left.axvline(2 * rank, color="gray", ls="--", lw=1, label=f"2r = {2 * rank}")
    left.set_xlim(0, min(len(record.spectra[-1][0]), 8 * rank))
    _label(left, "index i", "sigma_i(W_l(T) - W_l(0)) / sigma_1")
    right.plot(record.iterations, record.angle_right, label="first layer's update vs V* (right)")
    right.plot(record.iterations, record.angle_left, label="last layer's update vs U* (left)")
    _label(right, "iteration", "largest principal angle (degrees)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def ablation_figure(table: dict[tuple[int, float], int | None], path: str | Path,
                    reference: int | None = None, title: str = "") -> Path:
    """Iterations to the tolerance against alpha, one line per width r_hat; `reference`
    (the wide DLN's) as a horizontal line; runs that never reached it are left out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for width in sorted({w for w, _ in table}):
        pts = sorted((a, it) for (w, a), it in table.items() if w == width and it is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"C-DLN, r_hat = {width}")
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="wide DLN")
    ax.set_xscale("log", base=2)
    _label(ax, "alpha (outer-layer learning rate multiplier)", "iterations to the tolerance")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _label(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
