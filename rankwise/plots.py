"""Pictures: ranks of a compression, deep linear network experiments, training curves."""
from __future__ import annotations

from pathlib import Path


def rank_chart(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]],
               path: str | Path, title: str = "") -> Path:
    """Bar chart of each targeted layer's rank, as the fraction of its full rank kept
    (dense layers at 1), coloured by layer kind (q, k, v, o, gate, up, down, ...)."""
    plt = _pyplot()
    names = list(shapes)
    kinds = [n.rsplit(".", 1)[-1] for n in names]
    palette = {k: plt.cm.tab10(i % 10) for i, k in enumerate(dict.fromkeys(kinds))}
    kept = [1.0 if ranks.get(n) is None else ranks[n] / min(shapes[n]) for n in names]
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.06), 3.5))
    ax.bar(range(len(names)), kept, width=1.0, color=[palette[k] for k in kinds])
    ax.set_xlabel("targeted layer (model order)")
    ax.set_ylabel("rank / full rank")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in palette.values()],
              labels=list(palette), ncol=len(palette), fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def recovery_curves(runs: dict[str, list], path: str | Path, title: str = "") -> Path:
    """Relative error against iteration (top) and training seconds (bottom), one column per
    problem; `runs` maps a problem name to its traces (rankwise.dln.Trace)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 6.4), squeeze=False)
    for col, (problem, traces) in enumerate(runs.items()):
        for trace in traces:
            label = f"{trace.network} ({trace.params:,} params)"
            axes[0, col].semilogy(trace.iterations, trace.errors, label=label)
            axes[1, col].semilogy(trace.seconds, trace.errors, label=label)
        axes[0, col].set_title(problem, fontsize=10)
        axes[0, col].set_xlabel("iteration")
        axes[1, col].set_xlabel("training seconds")
        for ax in axes[:, col]:
            ax.set_ylabel("||W - M*||_F / ||M*||_F")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def subspace_figure(record, rank: int, path: str | Path, title: str = "") -> Path:
    """The wide DLN's updates W_l(t) - W_l(0): their singular values at the end of
    training (left), and the largest principal angle between their top-r singular
    subspaces and the target's (right)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for l, s in enumerate(record.spectra[-1]):
        s = s / s[0] if s[0] > 0 else s
        left.semilogy(range(1, len(s) + 1), s.clamp_min(1e-16), ".-", ms=3, label=f"layer {l + 1}")
    left.axvline(2 * rank, color="gray", ls="--", lw=1, label=f"2r = {2 * rank}")
    left.set_xlabel("index i")
    left.set_ylabel("sigma_i(W_l(T) - W_l(0)) / sigma_1")
    left.set_xlim(0, min(len(record.spectra[-1][0]), 8 * rank))
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.plot(record.iterations, record.angle_right, label="first layer's update vs V* (right)")
    right.plot(record.iterations, record.angle_left, label="last layer's update vs U* (left)")
    right.set_xlabel("iteration")
    right.set_ylabel("largest principal angle (degrees)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def ablation_figure(table: dict[tuple[int, float], int | None], path: str | Path,
                    reference: int | None = None, title: str = "") -> Path:
    """Iterations to the tolerance against alpha, one line per width r_hat; `reference`
    (the wide DLN's) as a horizontal line; runs that never reached it are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for width in sorted({w for w, _ in table}):
        pts = sorted((a, it) for (w, a), it in table.items() if w == width and it is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"C-DLN, r_hat = {width}")
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="wide DLN")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("alpha (outer-layer learning rate multiplier)")
    ax.set_ylabel("iterations to the tolerance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def training_curves(history, shapes: dict[str, tuple[int, int]], path: str | Path,
                    title: str = "") -> Path:
    """Fine-tuning under a rank constraint: training loss (top) and, at every proximal
    step, each layer's rank as a fraction of its full rank (thin lines) with the kept
    fraction of the targeted parameters (thick) (bottom), against step."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    top.plot([r.step for r in history], [r.loss for r in history], lw=0.8)
    top.set_ylabel("training loss")
    top.grid(alpha=0.3)
    dense = sum(m * n for m, n in shapes.values())
    prox = [r for r in history if r.ranks]
    for name in shapes:
        bottom.plot([r.step for r in prox], [r.ranks[name] / min(shapes[name]) for r in prox],
                    color="tab:blue", alpha=min(0.5, max(0.1, 8 / len(shapes))), lw=0.6)
    bottom.plot([r.step for r in history], [r.params / dense for r in history], color="k",
                lw=2, label="kept fraction of parameters")
    bottom.set_xlabel("step")
    bottom.set_ylabel("rank / full rank")
    bottom.set_ylim(0, 1.05)
    bottom.legend(fontsize=7)
    bottom.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
