"""Calibration levers, in-domain vs off-domain: source (WikiText / mixture / self), size,
damping toward the identity and allocation, for kfac at one ratio.

For every calibration (sources x windows) the statistics are collected once; every damping
x allocation variant is projected from them. Scores: perplexity and its ratio to dense on
each shipped domain (WikiText-2 is in-domain when it is calibrated on; pydoc and code are
off-domain unless a mixture holds them), KL and top-1 on WikiText-2 test.

    python bench/calibration.py --sources wikitext "wikitext pydoc code" self
        [--windows 32] [--dampings 1e-6 1e-2] [--allocations uniform spectrum] [--ratio 0.2]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from common import Domains, header

from rankwise import CompressConfig, compress_
from rankwise.data.windows import Draw, mixture_windows, parse_sources
from rankwise.formats.loading import load_model
from rankwise.models.blocks import target_linears
from rankwise.statistics import hooks as stats


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", nargs="+", default=["wikitext"],
                   help="calibrations, each a space-separated list of NAME[:WEIGHT]")
    p.add_argument("--windows", nargs="+", type=int, default=[32],
                   help="calibration windows of --seqlen tokens (one statistics pass each)")
    p.add_argument("--dampings", nargs="+", type=float, default=[1e-6])
    p.add_argument("--allocations", nargs="+", default=["uniform", "spectrum"])
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=1,
                   help="cuts; above 1 every variant measures its own statistics per stage")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    args = p.parse_args()
    torch.manual_seed(0)

    dense, tokenizer, _ = load_model()
    domains = Domains(dense, tokenizer, args.eval_windows, args.seqlen)
    layers = target_linears(dense)
    rows = [("dense", "-", "-", "-", domains.dense, 0.0)]
    print(f"dense: {domains.dense.cells()}", flush=True)
    for spec in args.sources:
        for count in args.windows:
            t0 = time.perf_counter()
            calib, _ = mixture_windows(parse_sources(spec.split()), tokenizer, dense,
                                       Draw(count, args.seqlen))
            t_sample = time.perf_counter() - t0
            collected = stats.collect(dense, layers, calib.split(4), gradients="full") \
                if args.steps == 1 else None
            t_stats = time.perf_counter() - t0
            for damping in args.dampings:
                for allocation in args.allocations:
                    model = copy.deepcopy(dense)
                    config = CompressConfig(metric="kfac", ratio=args.ratio, damping=damping,
                                            allocation=allocation, steps=args.steps)
                    summary = compress_(model, config, calib, precomputed=collected,
                                        progress=False)
                    scores = domains.score(model)
                    seconds = t_stats + summary.seconds["total"]
                    label = allocation + (f"x{args.steps}" if args.steps > 1 else "")
                    rows.append((spec, count * args.seqlen, damping, label, scores, seconds))
                    print(f"  {spec} | {count * args.seqlen} tokens | damping {damping} | {label}: "
                          f"{scores.cells()} ({seconds:.0f} s, sampling {t_sample:.0f} s)",
                          flush=True)
                    del model

    print(f"\nSmolLM2-135M-Instruct, kfac, ratio {args.ratio}; evaluation {domains.describe()}")
    print(f"{'calibration':28s} {'tokens':>7s} {'damping':>8s} {'allocation':12s} {header()} "
          f"{'s':>6s}")
    for spec, tokens, damping, label, scores, seconds in rows:
        print(f"{spec:28s} {tokens!s:>7s} {damping!s:>8s} {label:12s} {scores.cells()} "
              f"{seconds:6.0f}")


if __name__ == "__main__":
    main()
