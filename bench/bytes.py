"""Quality at equal bytes: the dense model's block linears rounded to b-bit integers against
rankwise outputs whose factors are rounded the same way (ratio x factor bits).

Rows, all on SmolLM2-135M-Instruct's block linears (the layers rankwise targets; the
embeddings and norms are the same in every row and not counted):
  dense float         the embedded model as it loads
  dense q4_1 g32      4-bit groups of 32 with a minimum, round to nearest: the grid of the
                      GGUF file the model ships as, so it reproduces the dense weights
                      exactly (the model's weights ARE 4-bit: compare below 4.5 bits)
  dense B gG R        B-bit symmetric integers (per row at 8 bits, groups of G inputs
                      below), rounding R: rtn (round to nearest) or gptq (rankwise's
                      error-compensating rounding, the very code the factors use)
  rankwise P xB R     the default recipe (or --cut) at ratio P with ranks in multiples of
                      the group size, factors stored in bfloat16 (B = 16) or rounded to B bits
Bits are per original targeted parameter as rankwise.ct_format stores them (integers
packed in 32-bit words, a 16-bit scale per row or group, a 16-bit minimum for q4_1).
WikiText-2, pydoc and code perplexity (and ratio to dense), KL to dense and top-1 on
WikiText-2; the PNG plots WikiText-2 perplexity against bits.

    python bench/bytes.py [--ratios 0.2 0.4] [--windows 20] [--cut oneshot] [--png bench/bytes.png]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from rankwise import CompressConfig, compress_
from rankwise.cache import Cache
from rankwise.config import DEFAULT_CALIBRATION
from rankwise.data import mixture_windows, parse_sources
from rankwise.layers import LowRankLinear
from rankwise.models import load_model, model_path, target_linears
from rankwise.quantize import Grid, is_quantized, quantize_model, stored_bits

from common import Domains, header

GROUP = 64


def q4_1(model, layers) -> None:
    """The GGUF Q4_1 grid: per group of 32, x = d q + m with q in [0, 15], d and m float16."""
    with torch.no_grad():
        for linear in layers.values():
            w = linear.weight.unflatten(1, (-1, 32))
            low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            d = ((high - low) / 15).half().float().clamp_min(1e-12)
            m = low.half().float()
            linear.weight.copy_((((w - m) / d).round().clamp(0, 15) * d + m).flatten(1))


def bits_per_parameter(model, dense_layers: dict) -> float:
    """Stored bits of the targeted layers over their dense parameter count."""
    total = 0
    for name in dense_layers:
        layer = model.get_submodule(name)
        parts = [layer.A, layer.B] if isinstance(layer, LowRankLinear) else [layer]
        total += sum(stored_bits(p) if is_quantized(p) else 16 * p.weight.numel() for p in parts)
    dense = sum(m.weight.numel() for m in dense_layers.values())
    return total / dense


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4])
    p.add_argument("--dense-bits", nargs="*", type=int, default=[8, 4, 3, 2])
    p.add_argument("--factor-bits", nargs="*", type=int, default=[8, 4])
    p.add_argument("--windows", type=int, default=20, help="evaluation windows per domain")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--cut", choices=("anchored", "oneshot"), default=None,
                   help="the rankwise rows' cut (default: the package's)")
    p.add_argument("--png", default="bench/bytes.png")
    args = p.parse_args()
    torch.manual_seed(0)

    dense, tokenizer, _ = load_model()
    layers = target_linears(dense)
    cache = Cache()      # the windows rankwise compress samples, shared with it
    calib, _ = mixture_windows(parse_sources(list(DEFAULT_CALIBRATION)), tokenizer, dense,
                               args.calib_samples, 512, seed=0, progress=False, cache=cache,
                               model_key=cache.digest(model_path(None)))
    domains = Domains(dense, tokenizer, args.windows)
    print(f"SmolLM2-135M-Instruct (dense weights: Q4_1 GGUF), {torch.get_num_threads()} "
          f"threads; calibration {tuple(calib.shape)}; evaluation {domains.describe()}")
    print(f"{'row':28s} {'bits':>6s} " + header() + f" {'s':>5s}")
    points = []

    def row(label: str, model, bits: float, seconds: float, kind: str):
        scores = domains.score(model)
        print(f"{label:28s} {bits:6.2f} {scores.cells()} {seconds:5.0f}", flush=True)
        points.append((kind, label, bits, scores.ppl["wikitext"]))

    row("dense float", dense, 16.0, 0, "float")
    model = copy.deepcopy(dense)
    q4_1(model, target_linears(model))
    row("dense q4_1 g32 (GGUF grid)", model, 4 + 32 / 32, 0, "q4_1")
    for bits in args.dense_bits:
        for rounding in ("rtn", "gptq"):
            model, t = copy.deepcopy(dense), time.time()
            quantize_model(model, Grid.for_bits(bits, GROUP), calib, 4, torch.float16,
                           rounding, dense=target_linears(model))
            group = "row" if bits == 8 else f"g{GROUP}"
            row(f"dense {bits} {group} {rounding}", model, bits_per_parameter(model, layers),
                time.time() - t, f"dense {rounding}")
    for ratio in args.ratios:
        base, t = copy.deepcopy(dense), time.time()
        compress_(base, CompressConfig(ratio=ratio, rank_multiple=GROUP, cut=args.cut), calib,
                  progress=False)
        row(f"rankwise {ratio} x16", base, bits_per_parameter(base, layers), time.time() - t,
            "rankwise")
        for bits in args.factor_bits:
            for rounding in ("rtn", "gptq"):
                model, t = copy.deepcopy(base), time.time()
                quantize_model(model, Grid.for_bits(bits, GROUP), calib, 4, torch.bfloat16,
                               rounding)
                row(f"rankwise {ratio} x{bits} {rounding}", model,
                    bits_per_parameter(model, layers), time.time() - t, f"rankwise {rounding}")
    if args.png:
        plot(points, args.png)


def plot(points, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"dense rtn": ("C0", "o-"), "dense gptq": ("C1", "s-"), "rankwise rtn": ("C2", "^"),
              "rankwise gptq": ("C3", "D"), "rankwise": ("C3", "*"), "float": ("k", "x"),
              "q4_1": ("k", "+")}
    for kind, (color, marker) in styles.items():
        mine = sorted((b, ppl) for k, _, b, ppl in points if k == kind)
        if mine:
            ax.plot(*zip(*mine), marker, color=color, label=kind, markersize=7)
    ax.set_xlabel("bits per original targeted parameter")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: dense quantized vs low rank + quantized factors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
