"""Pictures of a compression: kept fraction of parameters per layer."""
from __future__ import annotations

from pathlib import Path


def rank_chart(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]],
               path: str | Path, title: str = "") -> Path:
    """Bar chart of each targeted layer's rank, as the fraction of its full rank kept
    (dense layers at 1), coloured by layer kind (q, k, v, o, gate, up, down, ...)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
