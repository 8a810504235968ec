"""Memory and time of one compression as the model gets deeper: per-block statistics and
projection seconds, peak device memory, peak resident memory while compressing (and how
much of it is not the model), bytes spilled to disk, at several depths side by side.

Each depth runs in a fresh process (peak memory is per process). The embedded
SmolLM2-135M keeps its first N blocks (real weights, shipped WikiText-2 calibration); the
Llama shapes are randomly initialised from configs with N blocks (quality on random
weights means nothing; time and memory do): the TinyLlama 1.1B shape and the Llama-2-7B
shape.

    python bench/scale.py --layers 2 4 8                          # SmolLM2 width, CPU
    python bench/scale.py --model tinyllama-1.1b --layers 22 --device cuda --dtype bfloat16
    python bench/scale.py --model llama-2-7b --layers 2 4 8 --device cuda --dtype bfloat16 \\
        --onload --seqlen 2048
    python bench/scale.py --model llama-2-7b --layers 1 --profile ...   # where a block's time goes
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
}


def build(args):
    """(model, calibration windows) with args.layers blocks."""
    import torch

    if args.model == "smollm2":
        from rankwise.data.windows import (CALIBRATION_TEXT, calibration_windows, read_text,
                                           tokenize)
        from rankwise.formats.loading import load_model
        from rankwise.models.blocks import find_blocks
        model, tokenizer, _ = load_model(None, args.dtype)
        _, blocks = find_blocks(model)
        del blocks[args.layers:]
        model.config.num_hidden_layers = args.layers
        calib = calibration_windows(tokenize(tokenizer, read_text(CALIBRATION_TEXT)),
                                    args.calib_samples, args.seqlen)
        return model, calib
    from transformers import AutoModelForCausalLM, LlamaConfig
    config = LlamaConfig(**SHAPES[args.model], num_hidden_layers=args.layers)
    with torch.device("cpu" if args.onload else args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(0)
    return model, torch.randint(0, config.vocab_size, (args.calib_samples, args.seqlen), generator=g)


def _status(field: str) -> float:
    """A memory figure of /proc/self/status, in GiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2**20


def _reset_peak_rss() -> float:
    """Start the peak resident memory (VmHWM) afresh from now (Linux); the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def one(args) -> dict:
    """Build, then compress once in this process; report what it cost."""
    import torch

    from rankwise import CompressConfig, compress_
    from rankwise.cut.compress import Execution
    from rankwise.models.host import release_host_memory
    from rankwise.pipeline.placement import Placement
    model, calib = build(args)
    if not args.onload:
        model.to(args.device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    release_host_memory()
    rss_before = _reset_peak_rss()
    config = CompressConfig(metric="kfac", ratio=args.ratio, allocation=args.allocation,
                            cut=args.cut)
    execution = Execution(args.batch_size,
                          placement=Placement.of(model, args.device if args.onload else None))
    t0 = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            summary = compress_(model, config, calib, progress=False, execution=execution)
        key = "cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25), file=sys.stderr)
    else:
        summary = compress_(model, config, calib, progress=False, execution=execution)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak_rss = _status("VmHWM")
    return {"model": args.model, "layers": args.layers, "device": args.device,
            "dtype": args.dtype, "onload": args.onload, "tokens": calib.numel(),
            "wall_s": wall, "statistics_s": summary.seconds["statistics"],
            "projection_s": summary.seconds["projection"],
            "anchored_s": summary.seconds["anchored"],
            "peak_rss_gib": peak_rss, "rss_before_gib": rss_before,
            "model_gib": model_bytes / 2**30,
            "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "spilled_gib": summary.spilled_bytes / 2**30,
            "achieved_ratio": summary.achieved_ratio, **summary.decompositions}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", *SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8],
                   help="depths to compare (blocks kept or built)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--onload", action="store_true", help="model on the CPU, blocks visit --device")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--allocation", default="spectrum", choices=("uniform", "spectrum"))
    p.add_argument("--cut", default="anchored", choices=("oneshot", "anchored"),
                   help="anchored adds the two-stream walk and the refinement (column "
                        "'anchored s/block')")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="print the top operators (torch.profiler)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.layers = args.layers[0]
        print(json.dumps(one(args)))
        return
    rows = []
    for layers in args.layers:
        argv = [sys.executable, __file__, "--child", "--model", args.model, "--layers", str(layers),
                "--device", args.device, "--dtype", args.dtype, "--ratio", str(args.ratio),
                "--allocation", args.allocation, "--cut", args.cut,
                "--calib-samples", str(args.calib_samples),
                "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size)] + \
            (["--onload"] if args.onload else []) + (["--profile"] if args.profile else [])
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"the {layers}-block run failed (exit {done.returncode})")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    import torch
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.model} ({args.dtype}) on {where}, torch {torch.__version__}; kfac, "
          f"{args.allocation}, {args.cut} cut, ratio {args.ratio}; {args.calib_samples} x {args.seqlen} "
          f"calibration tokens, batch {args.batch_size}; onload {args.onload}")
    print(f"{'blocks':>6s} {'stats s/block':>14s} {'proj s/block':>13s} "
          f"{'anchored s/block':>17s} {'wall s':>8s} "
          f"{'peak device GiB':>16s} {'peak RSS GiB':>13s} {'RSS - model GiB':>16s} "
          f"{'spilled GiB':>12s} {'eighs/block':>12s} {'values only':>12s} {'float64 redos':>14s} "
          f"{'eigh s/block':>13s}   (RSS: while compressing)")
    for r in rows:
        device = f"{r['peak_device_gib']:.2f}" if r["peak_device_gib"] is not None else "-"
        print(f"{r['layers']:6d} {r['statistics_s'] / r['layers']:14.2f} "
              f"{r['projection_s'] / r['layers']:13.2f} {r['anchored_s'] / r['layers']:17.2f} "
              f"{r['wall_s']:8.1f} {device:>16s} "
              f"{r['peak_rss_gib']:13.2f} {r['peak_rss_gib'] - r['model_gib']:16.2f} "
              f"{r['spilled_gib']:12.2f} {r['decompositions'] / r['layers']:12.1f} "
              f"{r['values_only'] / r['layers']:12.1f} {r['float64_redos']:14d} "
              f"{r['seconds'] / r['layers']:13.2f}")


if __name__ == "__main__":
    main()
