"""Memory and time of one compression: peak resident memory (CPU), peak device memory,
statistics and projection seconds.

Each configuration runs in a fresh process (peak RSS is per process). The embedded
SmolLM2-135M runs on the CPU; on a GPU, randomly initialised Llama shapes built locally
from configs (quality on random weights means nothing; time and memory do): the TinyLlama
1.1B shape and the Llama-2-7B shape, in bfloat16.

    python bench/scale.py                                    # SmolLM2-135M, CPU, as is and onloaded
    python bench/scale.py --model tinyllama-1.1b --device cuda --dtype bfloat16
    python bench/scale.py --model llama-2-7b --device cuda --dtype bfloat16 --onload --seqlen 2048
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}


def one(args) -> dict:
    """Load, calibrate and compress once in this process; report what it cost."""
    import torch

    from rankwise import CompressConfig, compress_
    from rankwise.data import CALIBRATION_TEXT, calibration_windows, read_text, tokenize
    from rankwise.models import load_model

    t0 = time.perf_counter()
    if args.model == "smollm2":
        model, tokenizer, _ = load_model(None, args.dtype)
        calib = calibration_windows(tokenize(tokenizer, read_text(CALIBRATION_TEXT)),
                                    args.calib_samples, args.seqlen)
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig
        config = LlamaConfig(**SHAPES[args.model])
        with torch.device("cpu" if args.onload else args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, config.vocab_size, (args.calib_samples, args.seqlen), generator=g)
    if not args.onload:
        model.to(args.device)
    loaded = time.perf_counter() - t0
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    summary = compress_(model, CompressConfig(metric="kfac", ratio=args.ratio), calib,
                        batch_size=args.batch_size, progress=False,
                        onload=args.device if args.onload else None)
    peak_device = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "onload": args.onload,
            "tokens": calib.numel(), "load_s": loaded,
            "statistics_s": summary.seconds["statistics"],
            "projection_s": summary.seconds["projection"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_device_gib": peak_device, "achieved_ratio": summary.achieved_ratio}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", *SHAPES), default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--onload", action="store_true", help="only this mode (default: both)")
    p.add_argument("--whole", action="store_true", help="only the whole-model mode")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args)))
        return
    modes = [True] if args.onload else [False] if args.whole else [False, True]
    rows = []
    for onload in modes:
        argv = [sys.executable, __file__, "--child", "--model", args.model, "--device",
                args.device, "--dtype", args.dtype, "--ratio", str(args.ratio), "--calib-samples",
                str(args.calib_samples), "--seqlen", str(args.seqlen), "--batch-size",
                str(args.batch_size)] + (["--onload"] if onload else [])
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\nkfac, ratio {args.ratio}, {args.calib_samples} x {args.seqlen} calibration tokens, "
          f"batch {args.batch_size}")
    print(f"{'model':16s} {'device':7s} {'dtype':9s} {'onload':7s} {'peak RSS GiB':>13s} "
          f"{'peak device GiB':>16s} {'statistics s':>13s} {'projection s':>13s}")
    for r in rows:
        device = f"{r['peak_device_gib']:.2f}" if r["peak_device_gib"] is not None else "-"
        print(f"{r['model']:16s} {r['device']:7s} {r['dtype']:9s} {str(r['onload']):7s} "
              f"{r['peak_rss_gib']:13.2f} {device:>16s} {r['statistics_s']:13.1f} "
              f"{r['projection_s']:13.1f}")


if __name__ == "__main__":
    main()
