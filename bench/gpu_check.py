"""The GPU check, one script for one device,
in under 8 minutes on one GPU. Random-weight Llama
shapes (quality means nothing there; time and memory do). Parts, in order, each a JSON
line printed as it finishes and appended to $OUT/gpu_check.jsonl (or --out):

  eigh       one 4096-wide symmetric eigendecomposition, float32 and float64, with
             eigenvectors and eigenvalues alone (what the allocation's spectra take),
             and rankwise's own checked solves (float32 checked in float64)
  onload7    Llama-2-7B width, model on the CPU, onloaded one block at a time, the default
             recipe at 0.2 (--cut oneshot for the plain cut), 32 x 2048 calibration tokens, at 4 and 8 blocks: wall seconds,
             statistics / projection seconds, decompositions and float64 redos, peak
             device memory (allocated and reserved), host peak
  whole11    TinyLlama-1.1B shape whole on the GPU, bfloat16, the default recipe at 0.2,
             32 x 512 tokens
  speed11    the 1.1B shape factored at 0.4 (uniform svd ranks) against dense:
             prefill batch 16 and decode batch 1, eager and compiled

    python bench/gpu_check.py [--parts eigh onload7 whole11 speed11] [--out DIR]
    python bench/gpu_check.py --dry      # tiny shapes on the CPU: the script's own test
    python bench/gpu_check.py --device cpu --parts eigh     # the solves on this CPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

SMALL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
BIG = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
           num_key_value_heads=32, vocab_size=32000)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


class Device:
    """The device's clock and memory counters (no-ops on the CPU of a dry run)."""

    def __init__(self, name: str):
        self.name, self.cuda = name, name.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> dict:
        gib = 2 ** 30
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        if not self.cuda:
            return {"peak_host_gib": host}
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib,
                "peak_host_gib": host}

    def describe(self) -> str:
        return torch.cuda.get_device_name() if self.cuda else "cpu"


def build(shape: dict, where: str, **over):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(0)
    with torch.device(where):
        return AutoModelForCausalLM.from_config(LlamaConfig(**{**shape, **over}),
                                                dtype=torch.bfloat16).eval()


def tokens(vocab: int, count: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, vocab, (count, seqlen), generator=torch.Generator().manual_seed(0))


def compress_timed(model, ids, dev: Device, onload: str | None, cut: str | None) -> dict:
    from rankwise import CompressConfig, compress_
    from rankwise.cut.compress import Execution
    from rankwise.pipeline.placement import Placement
    dev.sync()
    dev.reset()
    t0 = time.perf_counter()
    s = compress_(model, CompressConfig(ratio=0.2, cut=cut), ids, progress=False,
                  execution=Execution(batch_size=4, placement=Placement.of(model, onload)))
    dev.sync()
    return {"wall_s": time.perf_counter() - t0, "statistics_s": s.seconds["statistics"],
            "projection_s": s.seconds["projection"], "achieved": s.achieved_ratio,
            **s.decompositions, **dev.peaks()}


def part_eigh(dev: Device, dry: bool, cut: str | None) -> list[dict]:
    n = 64 if dry else 4096
    X = torch.randn(n, n, device=dev.name)
    S = X @ X.T / n
    from rankwise import geometry
    solves = [(f"torch.linalg.{name}", str(dtype), lambda s=solver, d=dtype: s(S.to(d)))
              for name, solver in (("eigh", torch.linalg.eigh), ("eigvalsh", torch.linalg.eigvalsh))
              for dtype in (torch.float32, torch.float64)]
    # what compress runs: float32 first, checked in float64 (redone there if refused)
    solves += [(f"rankwise.geometry.{solver.__name__}", "float32, checked",
                lambda s=solver: s(S[None])) for solver in (geometry.eigh, geometry.eigvalsh)]
    rows = []
    for name, dtype, solve in solves:
        solve()                                 # warm-up (solver workspace, kernels)
        dev.sync()
        t0 = time.perf_counter()
        solve()
        dev.sync()
        rows.append({"n": n, "solver": name, "dtype": dtype, "seconds": time.perf_counter() - t0})
    return rows


def part_onload7(dev: Device, dry: bool, cut: str | None) -> list[dict]:
    rows = []
    for blocks in ((2,) if dry else (4, 8)):
        model = build(TINY if dry else BIG, "cpu", num_hidden_layers=blocks)
        ids = tokens(model.config.vocab_size, 8 if dry else 32, 64 if dry else 2048)
        rows.append({"blocks": blocks, **compress_timed(model, ids, dev, dev.name, cut)})
        del model
    return rows


def part_whole11(dev: Device, dry: bool, cut: str | None) -> list[dict]:
    model = build(TINY if dry else SMALL, dev.name)
    ids = tokens(model.config.vocab_size, 8 if dry else 32, 64 if dry else 512).to(dev.name)
    return [compress_timed(model, ids, dev, None, cut)]


def part_speed11(dev: Device, dry: bool, cut: str | None) -> list[dict]:
    import copy

    from rankwise import CompressConfig, accelerate, compress_, measure_speed
    dense = build(TINY if dry else SMALL, dev.name, max_position_embeddings=2048)
    factored = copy.deepcopy(dense)
    compress_(factored, CompressConfig(metric="svd", ratio=0.4, allocation="uniform"),
              progress=False)
    rows = []
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            dense, factored = accelerate(dense), accelerate(factored)
        for batch, what in ((16, "prefill"), (1, "decode")):
            try:
                d, f = (measure_speed(m, prompt_len=16 if dry else 128, decode_tokens=4 if dry
                                      else 64, batch_size=batch) for m in (dense, factored))
            except Exception as e:  # noqa: BLE001 - a failure is a result on a first run
                rows.append({"mode": mode, "batch": batch, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            key = f"{what}_tokens_per_s"
            rows.append({"mode": mode, "batch": batch, "what": what, "dense": getattr(d, key),
                         "factored": getattr(f, key), "x_dense": getattr(f, key) / getattr(d, key)})
    return rows


PARTS = {"eigh": part_eigh, "onload7": part_onload7, "whole11": part_whole11,
         "speed11": part_speed11}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS))
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--cut", choices=("anchored", "oneshot"), default=None,
                   help="the compress parts' cut (default: the package's, anchored for kfac)")
    p.add_argument("--device", default="cuda",
                   help="cpu times the eigh part on this machine's cores (full sizes)")
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args()
    dev = Device("cpu" if args.dry else args.device)
    out = Path(args.out) / "gpu_check.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device: {dev.describe()}, torch {torch.__version__}", flush=True)
    for name in args.parts:
        t0 = time.perf_counter()
        try:
            rows = PARTS[name](dev, args.dry, args.cut)
        except Exception as e:  # noqa: BLE001 - record it and go on to the next part
            rows = [{"error": f"{type(e).__name__}: {e}"[:500]}]
        for row in rows:
            line = json.dumps({"part": name, "device": dev.describe(), **row})
            print(line, flush=True)
            with out.open("a") as f:
                f.write(line + "\n")
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
