"""`rankwise report`: one self-contained HTML page comparing runs.

A run is a rankwise output folder: its rankwise.json (recipe, ranks, parameters), its
eval.json when `rankwise eval` has scored it (perplexity per text, KL, top-1, lm-eval
tasks, speed), and its ranks.png. The page holds a sortable table of every run, a Pareto
plot of quality against kept parameters, and the rank charts, all inline (no file or
network access when it is opened).
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import RankwiseError
from ..formats.atomic import write_file
from ..formats.folder import EVAL_FILE, read_manifest
from ..formats.manifest import Manifest
from ..options import option
from .plots import pyplot

_SIGNATURE = "<!-- written by rankwise report -->"


@dataclass
class ReportConfig:
    runs: list[str] = option(help="rankwise output folders to compare", factory=list,
                             positional=True, required=True, metavar="RUN")
    out: str = option("report.html", "the HTML file to write")
    title: str = option("rankwise runs", "the page's title")


@dataclass
class Run:
    name: str
    folder: Path
    manifest: Manifest
    scores: dict | None          # eval.json, when the run was evaluated

    @property
    def kept_fraction(self) -> float:
        p = self.manifest.targeted_params
        return p["compressed"] / p["dense"] if p.get("dense") else float("nan")

    def recipe(self) -> dict:
        c = self.manifest.config or self.manifest.finetune or {}
        sources = [s.get("source") for s in (self.manifest.calibration or {}).get("sources", [])]
        return {"metric": c.get("metric", "-"), "allocation": c.get("allocation", c.get("method", "-")),
                "steps": c.get("steps", "-"), "calibration": "+".join(sources) or "-",
                "healed": "yes" if self.manifest.heal else ""}


def read_runs(folders: list[str]) -> list[Run]:
    runs, names = [], set()
    for folder in folders:
        folder = Path(folder)
        manifest = read_manifest(folder)
        scores = folder / EVAL_FILE
        name = folder.name if folder.name not in names else str(folder)
        names.add(name)
        runs.append(Run(name, folder, manifest,
                        json.loads(scores.read_text()) if scores.exists() else None))
    if not runs:
        raise RankwiseError("give at least one rankwise output folder to report on")
    return runs


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def pareto_figure(runs: list[Run]) -> str | None:
    """Perplexity / dense on every evaluated text against the kept fraction of the
    targeted parameters, one panel per text, the Pareto front of each drawn."""
    scored = [r for r in runs if r.scores and r.scores.get("texts")]
    texts = sorted({t for r in scored for t in r.scores["texts"]})
    if not texts:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(texts), figsize=(4.2 * len(texts), 3.6), squeeze=False)
    for ax, text in zip(axes[0], texts):
        points = []
        for r in scored:
            t = r.scores["texts"].get(text)
            if t and t.get("reference_perplexity"):
                points.append((r.kept_fraction, t["perplexity"] / t["reference_perplexity"], r.name))
        for x, y, name in points:
            ax.scatter(x, y, s=18)
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        front, best = [], float("inf")
        for x, y, _ in sorted(points):         # fewer kept parameters first
            if y < best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.plot(*zip(*front), "k--", lw=0.8, label="Pareto front")
            ax.legend(fontsize=7)
        ax.set_title(text, fontsize=9)
        ax.set_xlabel("kept fraction of targeted parameters")
        ax.set_ylabel("perplexity / dense")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _cell(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _rows(runs: list[Run]) -> tuple[list[str], list[list]]:
    texts = sorted({t for r in runs if r.scores for t in r.scores.get("texts", {})})
    tasks = sorted({t for r in runs if r.scores for t in r.scores.get("tasks", {})})
    head = ["run", "metric", "allocation", "steps", "calibration", "healed", "ratio",
            "kept params"] + [f"{t} ppl" for t in texts] + [f"{t} x dense" for t in texts] \
        + ["KL (wikitext)", "top-1 (wikitext)"] + [f"{t} acc" for t in tasks] \
        + ["prefill x dense", "decode x dense"]
    rows = []
    for r in runs:
        s = r.scores or {}
        t = s.get("texts", {})
        first = t.get("wikitext") or next(iter(t.values()), {})
        speed = s.get("speed", {})
        achieved = r.manifest.achieved_ratio
        rows.append([r.name, *r.recipe().values(), "-" if achieved is None else achieved,
                     r.manifest.targeted_params.get("compressed", "-")]
                    + [t[x]["perplexity"] if x in t else "-" for x in texts]
                    + [t[x]["perplexity"] / t[x]["reference_perplexity"]
                       if x in t and t[x].get("reference_perplexity") else "-" for x in texts]
                    + [first.get("kl", "-"), first.get("top1_agreement", "-")]
                    + [s.get("tasks", {}).get(x, {}).get("acc", "-") for x in tasks]
                    + [speed["prefill"] / speed["dense_prefill"] if "dense_prefill" in speed else "-",
                       speed["decode"] / speed["dense_decode"] if "dense_decode" in speed else "-"])
    return head, rows


_SCRIPT = """
document.querySelectorAll("th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const key = tr => { const v = tr.cells[column].dataset.value; return isNaN(v) ? v : +v; };
  const up = th.dataset.order !== "up";
  th.dataset.order = up ? "up" : "down";
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : -1) * (up ? 1 : -1))
    .forEach(tr => body.appendChild(tr));
}));
document.getElementById("count").textContent = document.querySelectorAll("tbody tr").length;
"""


def write_report(config: ReportConfig) -> Path:
    """Write the page for config.runs to config.out (atomically); returns its path."""
    out = Path(config.out)
    if out.exists() and (out.is_dir() or _SIGNATURE not in out.read_bytes()[:512].decode(errors="replace")):
        raise RankwiseError(f"refusing to overwrite {out}: it is not a page rankwise report wrote")
    runs = read_runs(config.runs)
    head, rows = _rows(runs)
    table = "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + \
        "</tr></thead><tbody>" + "".join(
            "<tr>" + "".join(f'<td data-value="{html.escape(str(v))}">{_cell(v)}</td>' for v in row)
            + "</tr>" for row in rows) + "</tbody></table>"
    pareto = pareto_figure(runs)
    charts = "".join(
        f"<figure><img alt='ranks of {html.escape(r.name)}' src='data:image/png;base64,"
        f"{base64.b64encode((r.folder / 'ranks.png').read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(r.name)}</figcaption></figure>"
        for r in runs if (r.folder / "ranks.png").exists())
    unscored = [r.name for r in runs if r.scores is None]
    page = f"""<!doctype html>
{_SIGNATURE}
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(config.title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ cursor: pointer; background: #f3f3f3; }}
td:first-child, th:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
figure {{ margin: 1em 0; }}
</style></head><body>
<h1>{html.escape(config.title)}</h1>
<p><span id="count">?</span> runs. Ratio: fraction of the targeted parameters
removed. Perplexity ratios and KL are against each run's dense model (from `rankwise eval`,
which writes eval.json into the run's folder).{
    " Not evaluated yet: " + html.escape(", ".join(unscored)) + "." if unscored else ""}
Click a column to sort.</p>
{table}
{f"<h2>Quality against size</h2><img alt='Pareto plot' src='data:image/png;base64,{pareto}'>"
 if pareto else ""}
<h2>Ranks per layer</h2>
{charts or "<p>No rank charts.</p>"}
<script>{_SCRIPT}</script>
</body></html>
"""
    return write_file(out, page)
