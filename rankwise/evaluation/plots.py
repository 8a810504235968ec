"""Pictures: the ranks of a compression, fine-tuning curves (and the history beside them)."""
from __future__ import annotations

from pathlib import Path

from ..formats.atomic import write_file
from ..train.loop import history_json


def rank_chart(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]],
               path: str | Path, title: str = "") -> Path:
    """Bar chart of each targeted layer's rank, as the fraction of its full rank kept
    (dense layers at 1), coloured by layer kind (q, k, v, o, gate, up, down, ...)."""
    plt = pyplot()
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
    return save_figure(fig, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """The figure as a PNG file, written atomically."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    pyplot().close(fig)
    return write_file(path, buffer.getvalue())


def training_curves(history, shapes: dict[str, tuple[int, int]], path: str | Path,
                    title: str = "") -> Path:
    """Fine-tuning under a rank constraint: training loss (top) and, at every proximal
    step, each layer's rank as a fraction of its full rank (thin lines) with the kept
    fraction of the targeted parameters (thick) (bottom), against step."""
    plt = pyplot()
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
    return save_figure(fig, path)


def write_training_outputs(result, folder: Path) -> None:
    """history.json (every step's record) and training.png (loss and ranks by step)."""
    c = result.config
    write_file(folder / "history.json", history_json(result))
    training_curves(result.history, result.shapes, folder / "training.png",
                    f"{c.method}, {c.metric}, ratio {result.achieved_ratio:.3f}")
