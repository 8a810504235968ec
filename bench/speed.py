"""Prefill and decode tokens/s of a dense model against its factored versions with
`generate`, as users call it: under torch.inference_mode, eager and on the fast path
(rankwise.accelerate: a static KV cache and the decoding step compiled by transformers;
"graphs" is the same with mode="reduce-overhead", CUDA graphs, on a GPU), at every batch
size asked, in one process.

Models: the embedded SmolLM2-135M, or random weights of a Llama shape (`--shape`; quality
means nothing there, time does). Ranks: `--allocation uniform` cuts every layer by the
ratio (svd: speed depends on shapes, not on the metric); `--allocation spectrum` is the
default recipe's allocation (kfac, spectrum; calibrated on 8 x 512 shipped WikiText-2
tokens, or random tokens for a random-weight shape), so some layers stay dense. The
factored model runs as `compress_` leaves it, its sibling layers fused (q/k/v, gate/up);
`--unfused` adds the same model with every layer's two matmuls separate.

Two ways users time prefill disagree, so both are shown: `generate` computes the LM head
on the last prompt position only ("prefill"), a plain forward under no_grad computes it on
every position ("forward": the 49,152-wide head of the 135M is 21% of its linear work per
token and is not factored, so that ratio is lower).

Every model runs once per round, rounds interleaved so drifting machine load hits all
alike; the table keeps the median of the rounds and each ratio is against the dense model
of the same mode and batch in the same run. The ideal is the ratio of linear-layer
multiply-adds per token (LM head included), which for these layers is also the ratio of
weight bytes read per decoded token.

    python bench/speed.py [--ratios 0.4] [--modes eager compiled] [--batches 1 16]
                          [--allocation uniform] [--unfused] [--int8] [--rounds 5]
    python bench/speed.py --device cuda --dtype bfloat16 --shape tinyllama-1.1b \\
        --modes eager compiled graphs --batches 1 16 --prompt 128 --decode 64
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
from pathlib import Path

import torch

from rankwise import CompressConfig, accelerate, compress_, load, measure_speed
from rankwise.evaluation.scoring import linear_macs
from rankwise.formats.loading import load_model
from rankwise.models.fusion import unfuse_siblings

SHAPES = {   # random-weight Llama shapes for a GPU (quality means nothing; time does)
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
MODES = {"eager": None, "compiled": "default", "graphs": "reduce-overhead"}


def dense_model(shape: str | None, device: str, dtype: torch.dtype):
    if shape is None:
        return load_model()[0].to(device, dtype)
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    return model.eval()


def calibration(shape: str | None, vocab: int) -> torch.Tensor:
    if shape is None:
        from rankwise.data.windows import (CALIBRATION_TEXT, calibration_windows, read_text,
                                           tokenize)
        tokenizer = load_model()[1]
        return calibration_windows(tokenize(tokenizer, read_text(CALIBRATION_TEXT)), 8, 512)
    return torch.randint(0, vocab, (8, 512), generator=torch.Generator().manual_seed(0))


def forward_tokens_per_s(model, prompt_len: int, batch: int) -> float:
    """Tokens/s of one plain forward over a random prompt (all positions' logits), no_grad."""
    import time
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        model(ids)                                     # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batch * prompt_len / (time.perf_counter() - t0)


def factored(dense, ratio: float, args) -> torch.nn.Module:
    model = copy.deepcopy(dense)
    if args.allocation == "uniform":
        config = CompressConfig(metric="svd", ratio=ratio, allocation="uniform",
                                rank_multiple=args.rank_multiple)
        compress_(model, config, progress=False)
    else:
        config = CompressConfig(ratio=ratio, rank_multiple=args.rank_multiple)
        calib = calibration(args.shape, dense.config.vocab_size).to(args.device)
        compress_(model, config, calib, progress=False)
    return model


def profile(base: dict, args) -> None:
    """Time per decoded token, and the share of the matmuls, for the dense model and the
    first factored one (eager generate, batch 1)."""
    import time

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler
    prompt = torch.randint(0, base["dense"].config.vocab_size, (1, args.prompt),
                           generator=torch.Generator().manual_seed(0)).to(args.device)
    for name, model in list(base.items())[:2]:
        def run(tokens):
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)
        with torch.inference_mode():
            run(4)
            with profiler(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                run(args.decode)
                wall = time.perf_counter() - t0
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm"))
        print(f"{name}: {wall / args.decode * 1e3:.1f} ms a token (prompt included), matmuls "
              f"{mm / total:.0%} of the profiled time, {mm / 1e3 / args.decode:.1f} ms a token")
        print(events.table(sort_by="self_cpu_time_total", row_limit=8))


def int8_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with every linear layer inside the blocks (dense weights or factors) in int8
    per output row, through torchao's weight-only kernel; embeddings and the LM head as
    they are, so dense and factored differ only in what rankwise changed."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    model = copy.deepcopy(model)
    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and ".layers." in name)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", nargs="*", type=float, default=[0.4])
    p.add_argument("--outputs", nargs="*", default=[], help="rankwise output folders to time "
                   "as rankwise.load gives them (embedded-model outputs: against its dense)")
    p.add_argument("--prompt", type=int, default=512, help="prefill length")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens per round")
    p.add_argument("--batches", nargs="+", type=int, default=[1], help="sequences per generate call")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is kept")
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["eager", "compiled"])
    p.add_argument("--allocation", choices=("uniform", "spectrum"), default="uniform")
    p.add_argument("--unfused", action="store_true", help="also time the factored models "
                   "with sibling fusion undone")
    p.add_argument("--int8", action="store_true", help="also time the dense model and each "
                   "factored one with int8 weight-only linears through torchao's quantize_ "
                   "(the same kernel for both; the factors are plain nn.Linear modules)")
    p.add_argument("--rank-multiple", type=int, default=0, help="as compress takes it "
                   "(0: the default, multiples of 64 for layers at least 1024 wide)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--shape", choices=tuple(SHAPES), help="random weights of this shape "
                   "instead of the embedded SmolLM2-135M")
    p.add_argument("--profile", action="store_true", help="instead of the table: where the "
                   "time of --decode eager decoded tokens goes (torch.profiler), dense and "
                   "the first ratio")
    args = p.parse_args()
    if "graphs" in args.modes and not args.device.startswith("cuda"):
        p.error("mode 'graphs' (CUDA graphs) needs --device cuda")
    torch.manual_seed(0)

    dense = dense_model(args.shape, args.device, getattr(torch, args.dtype))
    base = {"dense": dense}
    for ratio in args.ratios:
        base[f"ratio {ratio}"] = factored(dense, ratio, args)
        if args.unfused:
            base[f"{ratio} unfused"] = copy.deepcopy(base[f"ratio {ratio}"])
            unfuse_siblings(base[f"{ratio} unfused"])
    for folder in args.outputs:
        base[Path(folder).name[:14]] = load(folder).to(args.device, getattr(torch, args.dtype)).eval()
    if args.int8:
        base.update({f"{name} int8": int8_weights(model) for name, model in list(base.items())})
    if args.profile:
        return profile(base, args)
    models = {(name, mode): (accelerate(copy.deepcopy(m), mode=MODES[mode]) if MODES[mode] else m)
              for mode in args.modes for name, m in base.items()}
    runs = {(name, mode, b): [] for (name, mode) in models for b in args.batches}
    for round_ in range(args.rounds):
        for (name, mode, batch), speeds in runs.items():
            s = measure_speed(models[(name, mode)], args.prompt, args.decode, repeats=1,
                              batch_size=batch)
            forward = forward_tokens_per_s(base[name], args.prompt, batch) \
                if mode == args.modes[0] else float("nan")     # eager; the same in every mode
            speeds.append((s.prefill_tokens_per_s, s.decode_tokens_per_s, forward))
            print(f"  round {round_ + 1} {mode:8s} batch {batch:3d} {name:14s} prefill "
                  f"{s.prefill_tokens_per_s:9.1f} decode {s.decode_tokens_per_s:8.1f} "
                  f"forward {forward:9.1f}", flush=True)

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\n{args.shape or 'SmolLM2-135M-Instruct'} ({args.dtype}) on {where}, torch "
          f"{torch.__version__}; generate under inference_mode, prompt {args.prompt}, "
          f"{args.decode} decoded tokens (greedy); median of {args.rounds} interleaved rounds; "
          f"{args.allocation} ranks, rank multiple {args.rank_multiple or '0 (64 from 1024 wide)'}")
    print(f"{'mode':9s} {'batch':>5s} {'model':14s} {'prefill tok/s':>14s} {'x dense':>8s} "
          f"{'decode tok/s':>13s} {'x dense':>8s} {'forward x dense':>16s} {'ideal (MACs)':>13s}")
    dense_macs = linear_macs(dense)
    median = {k: [statistics.median(s[i] for s in v) for i in (0, 1, 2)] for k, v in runs.items()}
    for (name, mode, batch), (prefill, decode, forward) in median.items():
        ref = median[("dense", mode, batch)]
        print(f"{mode:9s} {batch:5d} {name:14s} {prefill:14.1f} {prefill / ref[0]:8.2f} "
              f"{decode:13.1f} {decode / ref[1]:8.2f} "
              f"{f'{forward / ref[2]:.2f}' if forward == forward else '-':>16s} "
              f"{dense_macs / linear_macs(base[name]):13.2f}")


if __name__ == "__main__":
    main()
