"""Prefill and decode tokens/s of the dense vs compressed SmolLM2-135M on this machine.

Ranks are those of a uniform ratio (the same for every metric), so the `svd` projection is
used: speed depends on shapes, not on the metric. Every model is timed best-of-N in one
process, interleaved, and compared as a ratio to the dense model of the same run. The ideal
is the ratio of linear-layer multiply-accumulates per token (LM head included), which for
these layers is also the ratio of weight bytes read per decoded token.

    python bench/speed.py [--ratios 0.2 0.4 0.6] [--rounds 3]
"""
from __future__ import annotations

import argparse
import copy

import torch

from rankwise import CompressConfig, compress_, measure_speed
from rankwise.evaluate import linear_macs
from rankwise.models import load_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--prompt", type=int, default=512, help="prefill length (batch 1)")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    args = p.parse_args()

    dense, _, _ = load_model()
    models = {"dense": dense}
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        compress_(model, CompressConfig(metric="svd", ratio=ratio), progress=False)
        models[f"ratio {ratio}"] = model
    best = {name: [0.0, 0.0] for name in models}
    for _ in range(args.rounds):   # interleave so drifting machine load hits all alike
        for name, model in models.items():
            s = measure_speed(model, args.prompt, args.decode, repeats=1)
            best[name][0] = max(best[name][0], s.prefill_tokens_per_s)
            best[name][1] = max(best[name][1], s.decode_tokens_per_s)

    dense_macs = linear_macs(dense)
    print(f"\nCPU, torch {torch.__version__}, {torch.get_num_threads()} threads; prefill "
          f"{args.prompt} tokens (batch 1), greedy decode {args.decode} tokens with KV cache; "
          f"best of {args.rounds}")
    print(f"{'model':10s} {'prefill tok/s':>14s} {'x dense':>8s} {'decode tok/s':>13s} "
          f"{'x dense':>8s} {'ideal (MACs)':>13s}")
    for name, (prefill, decode) in best.items():
        print(f"{name:10s} {prefill:14.1f} {prefill / best['dense'][0]:8.2f} {decode:13.1f} "
              f"{decode / best['dense'][1]:8.2f} {dense_macs / linear_macs(models[name]):13.2f}")


if __name__ == "__main__":
    main()
