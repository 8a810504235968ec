"""Speed as users measure it: `generate`, without autograd, eager or on the fast path
(a static KV cache and compiled decoding steps).

Eager decoding of a small model is dominated by per-token framework overhead (Python and
one kernel launch per op), not by the weights, so fewer multiply-adds hardly show. The
fast path fixes every shape (static cache) so that torch.compile can trace a decoding step
once into one graph; what is left is the work itself, which is where a factorized model
is cheaper.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn


def accelerate(model: nn.Module, compile: bool = True, mode: str | None = None) -> nn.Module:
    """The fast path for `model.generate`: a static KV cache (every decoding step the same
    shapes) and, with `compile`, the decoding steps compiled by transformers' own hook
    (`generation_config.compile_config`), on every device, CPU included. `mode` as
    torch.compile takes it: "reduce-overhead" replays each step as a CUDA graph on a GPU
    (and is plain inductor on a CPU); None = "default". The prompt's forward stays eager
    (its shape changes with every prompt). The first generate call compiles (tens of
    seconds); later ones are fast. Returns the model.

    The forward itself is never wrapped in torch.compile: generate compiles it once more
    for a static cache on a GPU, and a compiled function called from inside a CUDA graph
    of another one is what overwrote the graphs' outputs."""
    from transformers import CompileConfig
    config = model.generation_config
    config.cache_implementation = "static"
    if compile:
        config.compile_config = CompileConfig(fullgraph=False, dynamic=False,
                                              mode=mode or "default")
        config.compile_config._compile_all_devices = True   # transformers' own switch for CPUs
        config.disable_compile = False
    else:
        config.disable_compile = True
    return model


@dataclass
class Speed:
    prefill_tokens_per_s: float     # prompt tokens per second of the first generated token
    decode_tokens_per_s: float      # generated tokens per second after the first


@torch.inference_mode()
def measure_speed(model: nn.Module, prompt_len: int = 512, decode_tokens: int = 64,
                  repeats: int = 3, batch_size: int = 1, vocab_size: int | None = None,
                  seed: int = 0) -> Speed:
    """Best-of-`repeats` speed of `model.generate` (greedy) on a random prompt: prefill
    from generating one token, decode from generating 1 + `decode_tokens` tokens (the
    difference of the two). A warm-up call of each first (allocation, compilation)."""
    vocab = vocab_size or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=g).to(device)

    def timed(new_tokens: int) -> float:
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(1), timed(decode_tokens + 1)
    prefill = decode = math.inf
    for _ in range(repeats):
        first = timed(1)
        whole = timed(decode_tokens + 1)
        prefill, decode = min(prefill, first), min(decode, max(whole - first, 1e-9))
    return Speed(batch_size * prompt_len / prefill, batch_size * decode_tokens / decode)
