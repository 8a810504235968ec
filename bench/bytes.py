"""Quality against stored bits on SmolLM2-135M-Instruct's block linears: the dense model
rounded uniformly, the same allocator restricted to rounded weights (mixed precision, the
baseline that isolates what low rank adds), and --bits with every form.

Every row is made by compress_ as `rankwise compress` makes it (rounding on the two-stream
walk by rankwise's token-weighted GPTQ, anchored to the dense model), from one calibration
draw; the --bits and mixed rows share one measurement (plans.Measurement: the first walk,
its statistics and prices, made once and charged to the first row that uses it).

  dense          the embedded model as it loads. Its weights come from a Q4_1 GGUF file:
                 4-bit groups of 32 with a minimum reproduce them exactly (5.0 bits), so no
                 row offers that grid and no row above 4.5 bits says anything about it.
  uniform b      --ratio 0 --factor-bits b: every targeted layer rounded at b bits (8 bits
                 per row, fewer in groups of 64)
  mixed B        --bits B --forms rounded: each layer at 8, 4 or 3 bits, chosen by the
                 pricing and the knapsack --bits uses
  rankwise B     --bits B: every form (low rank, rounded, rounded plus a correction)
  HQQ g          a public calibration-free quantizer as its users run it (hqq's
                 HQQLinear, 4 bits, a scale and a zero per group of g, both 16-bit:
                 4 + 32/g bits), every targeted layer; scored from its dequantized float32
                 weights (HQQ's float32 compute), not saved
Columns: stored bits per original targeted parameter (as the weights file holds them);
perplexity and its ratio to dense on WikiText-2, pydoc and code; KL and top-1 on WikiText-2;
the weights file's bytes (embeddings and norms included, bfloat16); compress seconds.

    python bench/bytes.py [--bits 3.0 3.5 4.25] [--mixed 4.25] [--uniform 4]
                          [--hqq 128 64] [--calib-samples 16] [--windows 10]
                          [--png docs/figures/bytes.png]
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from common import Domains, header

from rankwise import CompressConfig, compress_, save
from rankwise.cut.choosing import Measurement
from rankwise.data.config import DEFAULT_CALIBRATION
from rankwise.data.windows import Draw, mixture_windows, parse_sources
from rankwise.formats.cache import Cache
from rankwise.formats.loading import load_model, model_path
from rankwise.formats.manifest import Manifest


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="*", type=float, default=[3.0, 3.5, 4.25])
    p.add_argument("--mixed", nargs="*", type=float, default=[4.25],
                   help="mixed-precision budgets (the least they make is about 3.3 bits)")
    p.add_argument("--uniform", nargs="*", type=int, default=[4])
    p.add_argument("--hqq", nargs="*", type=int, default=[128, 64],
                   help="HQQ 4-bit group sizes (pip install hqq)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512")
    p.add_argument("--windows", type=int, default=10, help="evaluation windows per text")
    p.add_argument("--refine-steps", type=int, default=CompressConfig.refine_steps)
    p.add_argument("--png", default="docs/figures/bytes.png")
    args = p.parse_args()
    torch.manual_seed(0)

    dense, tokenizer, _ = load_model()
    cache = Cache()      # the windows rankwise compress samples, shared with it
    calib, _ = mixture_windows(parse_sources(list(DEFAULT_CALIBRATION)), tokenizer, dense,
                               Draw(args.calib_samples, 512), progress=False, cache=cache,
                               model_key=cache.digest(model_path(None)))
    domains = Domains(dense, tokenizer, args.windows)
    print(f"SmolLM2-135M-Instruct (dense weights: Q4_1 GGUF), {torch.get_num_threads()} "
          f"threads; calibration {tuple(calib.shape)}; evaluation {domains.describe()}; "
          f"refinement {args.refine_steps} steps a block")
    print(f"{'row':16s} {'bits':>5s} " + header() + f" {'MB':>6s} {'s':>5s}")
    points = []

    def row(label: str, kind: str, model, seconds: float, summary=None):
        bits, size = stored(model, summary)
        scores = domains.score(model)
        print(f"{label:16s} {bits:5.2f} {scores.cells()} {size / 1e6:6.1f} {seconds:5.0f}",
              flush=True)
        points.append((kind, bits, scores.ratio["wikitext"]))

    row("dense", "dense", dense, 0.0)
    for group in args.hqq:
        model, seconds, bits = hqq(dense, group)
        scores = domains.score(model)
        print(f"{'HQQ g' + str(group):16s} {bits:5.2f} {scores.cells()} {'':>6s} {seconds:5.0f}",
              flush=True)
        points.append(("HQQ (calibration-free)", bits, scores.ratio["wikitext"]))
    for bits in args.uniform:
        row(f"uniform {bits}", "uniform GPTQ",
            *made(dense, calib, CompressConfig(ratio=0.0, factor_bits=bits)))
    with Measurement() as measurement:
        for budgets, kind, forms in ((args.bits, "rankwise --bits", None),
                                     (args.mixed, "mixed precision", ["rounded"])):
            for bits in budgets:
                config = CompressConfig(bits=bits, refine_steps=args.refine_steps,
                                        **({"forms": forms} if forms else {}))
                row(f"{'mixed' if forms else 'rankwise'} {bits}", kind,
                    *made(dense, calib, config, measurement))
    if args.png:
        plot(points, args.png)


def made(dense, calib, config: CompressConfig, measurement: Measurement | None = None):
    """(a copy of the dense model compressed by `config`, the seconds it took, its
    summary)."""
    model, t0 = copy.deepcopy(dense), time.perf_counter()
    summary = compress_(model, config, calib, progress=False, measurement=measurement)
    return model, time.perf_counter() - t0, summary


def hqq(dense, group: int):
    """(the dense model with every targeted layer quantized by HQQ at 4 bits in groups of
    `group` and dequantized to float32, the seconds it took, its stored bits)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from rankwise.models.blocks import target_linears
    model, t0 = copy.deepcopy(dense), time.perf_counter()
    config = BaseQuantizeConfig(nbits=4, group_size=group)
    with torch.no_grad():
        for layer in target_linears(model).values():
            quantized = HQQLinear(copy.deepcopy(layer), config, compute_dtype=torch.float32,
                                  device="cpu")
            layer.weight.copy_(quantized.dequantize())
    return model, time.perf_counter() - t0, 4 + 2 * 16 / group


def stored(model, summary) -> tuple[float, int]:
    """(bits per original targeted parameter, bytes of the weights file) as saved in
    bfloat16 (the dense row: 16 bits); the model is left as saved (its floats rounded to
    bfloat16), which is what loading the folder gives and what the row scores."""
    manifest = None if summary is None else Manifest(
        targeted_params={"dense": summary.dense_params}, forms=summary.layer_records())
    with tempfile.TemporaryDirectory() as folder:
        out = save(model, Path(folder) / "out", manifest, storage=torch.bfloat16)
        record = json.loads((out / "rankwise.json").read_text())["storage"]
        size = (out / "model.safetensors").stat().st_size
    return record["bits_per_targeted_param"] or 16.0, size


def plot(points, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"uniform GPTQ": ("C0", "o-"), "mixed precision": ("C1", "s-"),
              "HQQ (calibration-free)": ("C2", "^-"), "rankwise --bits": ("C3", "D-")}
    for kind, (color, marker) in styles.items():
        mine = sorted((b, r) for k, b, r in points if k == kind)
        if mine:
            ax.plot(*zip(*mine), marker, color=color, label=kind, markersize=6)
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="dense (Q4_1 GGUF weights)")
    ax.set_xlabel("stored bits per original targeted parameter")
    ax.set_ylabel("WikiText-2 perplexity / dense")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: quality against bits")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
