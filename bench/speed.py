"""Prefill and decode tokens/s of the dense vs compressed SmolLM2-135M with `generate`, as
users call it: under torch.inference_mode, eager, and on the fast path (static KV cache +
torch.compile: rankwise.accelerate).

Ranks are those of a uniform ratio (the same for every metric), so the `svd` projection is
used: speed depends on shapes, not on the metric. Every model runs best-of-N in one
process, interleaved round by round, and is compared as a ratio to the dense model of the
same mode in the same run. The ideal is the ratio of linear-layer multiply-adds per token
(LM head included), which for these layers is also the ratio of weight bytes read per
decoded token.

    python bench/speed.py [--ratios 0.2 0.4 0.6] [--rounds 3] [--modes eager compiled]
                          [--rank-multiple 1] [--batch 1] [--device cpu] [--shape NAME]
"""
from __future__ import annotations

import argparse
import copy
import platform

import torch

from rankwise import CompressConfig, accelerate, compress_, measure_speed
from rankwise.evaluate import linear_macs
from rankwise.models import load_model

SHAPES = {   # random-weight Llama shapes for a GPU (quality means nothing; time does)
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


def dense_model(shape: str | None, device: str, dtype: torch.dtype):
    if shape is None:
        return load_model()[0].to(device, dtype)
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--prompt", type=int, default=512, help="prefill length")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens per round")
    p.add_argument("--batch", type=int, default=1, help="sequences per generate call")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best is kept")
    p.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    p.add_argument("--rank-multiple", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--shape", choices=tuple(SHAPES), help="random weights of this shape "
                   "instead of the embedded SmolLM2-135M")
    args = p.parse_args()
    torch.manual_seed(0)

    dense = dense_model(args.shape, args.device, getattr(torch, args.dtype))
    base = {"dense": dense}
    for ratio in args.ratios:
        model = copy.deepcopy(dense)
        compress_(model, CompressConfig(metric="svd", ratio=ratio, rank_multiple=args.rank_multiple),
                  progress=False)
        base[f"ratio {ratio}"] = model
    models = {(name, mode): (accelerate(copy.deepcopy(m)) if mode == "compiled" else m)
              for mode in args.modes for name, m in base.items()}
    best = {key: [0.0, 0.0] for key in models}
    for round_ in range(args.rounds):   # interleave so drifting machine load hits all alike
        for key, model in models.items():
            s = measure_speed(model, args.prompt, args.decode, repeats=1, batch_size=args.batch)
            best[key][0] = max(best[key][0], s.prefill_tokens_per_s)
            best[key][1] = max(best[key][1], s.decode_tokens_per_s)
            print(f"  round {round_ + 1} {key[1]:8s} {key[0]:10s} prefill "
                  f"{s.prefill_tokens_per_s:9.1f} decode {s.decode_tokens_per_s:8.1f}", flush=True)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.shape or 'SmolLM2-135M-Instruct'} ({args.dtype}) on {where}, torch "
          f"{torch.__version__}; generate under inference_mode, batch {args.batch}, prompt "
          f"{args.prompt}, {args.decode} decoded tokens (greedy); best of {args.rounds} "
          f"interleaved rounds; rank multiple {args.rank_multiple}")
    print(f"{'mode':9s} {'model':10s} {'prefill tok/s':>14s} {'x dense':>8s} {'decode tok/s':>13s} "
          f"{'x dense':>8s} {'ideal (MACs)':>13s}")
    dense_macs = linear_macs(dense)
    for (name, mode), (prefill, decode) in best.items():
        ref = best[("dense", mode)]
        print(f"{mode:9s} {name:10s} {prefill:14.1f} {prefill / ref[0]:8.2f} {decode:13.1f} "
              f"{decode / ref[1]:8.2f} {dense_macs / linear_macs(base[name]):13.2f}")


if __name__ == "__main__":
    main()
