"""Perplexity on every shipped domain (and its ratio to dense), with KL to dense and top-1
agreement on WikiText-2 test, for each metric x ratio (uniform ratio) and more kfac rows.

Bench settings: SmolLM2-135M-Instruct, calibration 32 x 512 tokens (default: the package's
default mixture, seed 0; --calib for other sources), evaluation
40 x 512 tokens of each domain's evaluation part. Statistics of the one-shot rows are
collected once per kind (forward-only for whiten; forward + backward for fisher/kfac) and
their time is charged to every metric that uses them; every other row measures its own.

    python bench/quality.py [--metrics svd whiten fisher kfac] [--ratios 0.2 0.4]
                            [--spectrum-ratios 0.2 0.4 0.6] [--steps 4 --steps-ratios 0.2 0.4]
                            [--search-ratios 0.4 --search-seconds 1200]
                            [--rows spectrum@0.2 spectrum@0.2+anchored:r0 ...]

Every kfac row beyond the uniform grid is ALLOCATION@RATIO[xSTEPS][+anchored[:rN][:lrX][:mixM]]:
allocation uniform, spectrum or search, STEPS cuts with re-measured statistics, one-shot
unless +anchored (the two-stream cut, N refinement steps at learning rate X, anchor mix M;
defaults: the package's). --spectrum-ratios, --steps-ratios and --search-ratios are
shorthands for one-shot spectrum@R, spectrum@RxSTEPS and search@R. Each anchored row
prints its blocks' refinement loss before and after.
"""
from __future__ import annotations

import argparse
import copy
import re
import time

import torch
from common import Domains, header

from rankwise import CompressConfig, compress_
from rankwise.data.config import DEFAULT_CALIBRATION
from rankwise.data.windows import Draw, mixture_windows, parse_sources
from rankwise.formats.cache import Cache
from rankwise.formats.loading import load_model, model_path
from rankwise.geometry import DEFAULT_DAMPING
from rankwise.models.blocks import target_linears
from rankwise.statistics import hooks as stats
from rankwise.statistics.metrics import METRICS


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metrics", nargs="*", default=["svd", "whiten", "fisher", "kfac"])
    p.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4])
    p.add_argument("--spectrum-ratios", nargs="*", type=float, default=[0.2, 0.4, 0.6],
                   help="ratios for kfac with allocation=spectrum; none to skip")
    p.add_argument("--steps", type=int, default=4,
                   help="stages for the multi-step rows (kfac, spectrum, statistics "
                        "re-collected before each stage)")
    p.add_argument("--steps-ratios", nargs="*", type=float, default=[0.2, 0.4],
                   help="ratios for the multi-step rows; none to skip")
    p.add_argument("--search-ratios", nargs="*", type=float, default=[0.4],
                   help="ratios for kfac with allocation=search (seeded from spectrum; "
                        "--search-windows more calibration windows are its fitness data); "
                        "none to skip")
    p.add_argument("--search-seconds", type=float, default=1200,
                   help="time limit of each search")
    p.add_argument("--search-windows", type=int, default=4,
                   help="calibration windows, beyond --calib-samples, that the search scores "
                        "candidates on")
    p.add_argument("--rows", nargs="*", default=[], type=_row,
                   help="more kfac rows, each ALLOCATION@RATIO[xSTEPS][+anchored[:rN][:lrX][:mixM]]")
    p.add_argument("--calib", nargs="+", default=list(DEFAULT_CALIBRATION),
                   help="calibration sources NAME[:WEIGHT] (domains, files, self); default "
                        "the package's: " + " ".join(DEFAULT_CALIBRATION))
    p.add_argument("--damping", type=float, default=DEFAULT_DAMPING)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    torch.manual_seed(0)

    dense, tokenizer, _ = load_model()
    # search rows get --search-windows more windows as fitness data, so their statistics
    # come from the very windows every other row uses (the first ones of one seeded draw)
    cache = Cache()      # sampled windows shared with rankwise compress (same count and seed)
    with_fitness, drawn = mixture_windows(parse_sources(args.calib), tokenizer, dense,
                                          Draw(args.calib_samples + args.search_windows,
                                               args.seqlen), cache=cache,
                                          model_key=cache.digest(model_path(None)))
    calib = with_fitness[:args.calib_samples]
    domains = Domains(dense, tokenizer, args.windows, args.seqlen)

    oneshot = dict(cut="oneshot")
    runs = [(metric, "uniform", ratio, 1, oneshot) for ratio in args.ratios
            for metric in args.metrics]
    runs += [("kfac", "spectrum", ratio, 1, oneshot) for ratio in args.spectrum_ratios]
    runs += [("kfac", "spectrum", ratio, args.steps, oneshot) for ratio in args.steps_ratios]
    runs += [("kfac", "search", ratio, 1, oneshot) for ratio in args.search_ratios]
    runs += [("kfac", *row) for row in args.rows]

    # one-shot rows share one statistics pass per kind; the others measure their own
    layers = target_linears(dense)
    collected, stat_seconds = {}, {}
    for gradients in dict.fromkeys(_pass(run[0]) for run in runs if _shares_statistics(run)):
        t0 = time.perf_counter()
        collected[gradients] = stats.collect(dense, layers, calib.split(4), gradients=gradients)
        stat_seconds[gradients] = time.perf_counter() - t0
    rows = [("dense", "-", "-", domains.dense, 0.0, 0.0)]
    for metric, allocation, ratio, steps, cut in runs:
        model = copy.deepcopy(dense)
        kind = _pass(metric)
        config = CompressConfig(metric=metric, ratio=ratio, allocation=allocation, steps=steps,
                                damping=args.damping, search_generations=10_000,
                                search_seconds=args.search_seconds, **cut,
                                **({"search_windows": args.search_windows}
                                   if allocation == "search" else {}))
        if _shares_statistics((metric, allocation, ratio, steps, cut)):
            summary = compress_(model, config, precomputed=collected.get(kind), progress=False)
            seconds = summary.seconds["projection"] + stat_seconds.get(kind, 0.0)
        else:
            summary = compress_(model, config, with_fitness if allocation == "search" else calib,
                                progress=False)
            seconds = summary.seconds["total"]
        if summary.search is not None:
            print(f"  search: fitness KL {summary.search.seed_fitness:.4f} -> "
                  f"{summary.search.fitness:.4f} in {summary.search.generations} generations",
                  flush=True)
        for block, (before, after) in summary.refinement.items():
            print(f"  block {block:2d} refined: metric loss {before:.4g} -> {after:.4g} "
                  f"({100 * (after / before - 1):+.1f}%)", flush=True)
        label = allocation + (f"x{steps}" if steps > 1 else "") + _cut_label(config)
        scores = domains.score(model)
        rows.append((metric, label, f"{summary.achieved_ratio:.3f}", scores, seconds,
                     summary.seconds["projection"]))
        print(f"  {metric} {label} @ {ratio}: {scores.cells()} ({seconds:.0f} s; "
              f"{ {k: round(v, 1) for k, v in summary.seconds.items()} })", flush=True)
        del model

    print(f"\nSmolLM2-135M-Instruct; evaluation {domains.describe()} tokens; calibration "
          f"{calib.shape[0]} x {calib.shape[1]} from {drawn}; damping {args.damping}; torch "
          f"threads {torch.get_num_threads()}")
    print(f"{'metric':8s} {'recipe':28s} {'ratio':>6s} {header()} {'compress s':>11s} "
          f"{'(project s)':>11s}")
    for metric, alloc, ratio, scores, secs, proj in rows:
        print(f"{metric:8s} {alloc:28s} {ratio:>6s} {scores.cells()} {secs:11.1f} {proj:11.1f}")


def _row(spec: str) -> tuple[str, float, int, dict]:
    match = re.fullmatch(r"(uniform|spectrum|search)@([0-9.]+)(?:x(\d+))?"
                         r"(\+anchored((?::(?:r\d+|lr[0-9.e-]+|mix[0-9.]+))*))?", spec)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"bad row {spec!r}; expected ALLOCATION@RATIO[xSTEPS][+anchored[:rN][:lrX][:mixM]], "
            f"e.g. spectrum@0.2+anchored:r16")
    allocation, ratio, steps, anchored, options = match.groups()
    cut = dict(cut="anchored" if anchored else "oneshot")
    names = {"r": ("refine_steps", int), "lr": ("refine_lr", float), "mix": ("anchor_mix", float)}
    for option in filter(None, (options or "").split(":")):
        key = re.match(r"[a-z]+", option).group()
        name, kind = names[key]
        cut[name] = kind(option[len(key):])
    return allocation, float(ratio), int(steps or 1), cut


def _cut_label(config: CompressConfig) -> str:
    if config.cut == "oneshot":
        return ""
    return f"+anchored:r{config.refine_steps}" + \
        (f":lr{config.refine_lr:g}" if config.refine_lr != CompressConfig.refine_lr else "") + \
        (f":mix{config.anchor_mix:g}" if config.anchor_mix != 1 else "")


def _pass(metric: str) -> str | None:
    """The statistics pass a metric's row shares: forward only, or forward + backward (one
    full-gradient pass serves fisher's diagonal too)."""
    return "full" if METRICS[metric].gradients else None


def _shares_statistics(run) -> bool:
    metric, allocation, _, steps, cut = run
    return METRICS[metric].needs_calibration and allocation != "search" and steps == 1 \
        and cut["cut"] == "oneshot"


if __name__ == "__main__":
    main()
