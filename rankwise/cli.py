"""`rankwise <verb>`: a thin layer over the API. Bad input ends in one sentence, exit 2."""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from .config import ALLOCATIONS, CompressConfig, read_yaml
from .dln import PROBLEMS
from .errors import RankwiseError
from .geometry import DEFAULT_DAMPING, METRICS
from .train import METHODS, OPTIMIZERS, PENALTIES, PROX_METRICS, SHRINKS
from .transfer import WIDE_LAYERS
from .vision import DATASETS

log = logging.getLogger("rankwise")

CALIB_DEFAULTS = {"calib_samples": 32, "seqlen": 512, "seed": 0}


def _compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="factorize a model's linear layers and save it",
                       description="Replace the linear layers inside the transformer blocks by "
                                   "low-rank factors chosen in an information-geometric metric, "
                                   "and save the result to --out.")
    p.add_argument("--model", help="Hugging Face model folder or .gguf file "
                                   "(default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="projection metric: svd (Frobenius), whiten (input covariance), "
                        "fisher (diagonal Fisher on outputs), kfac (Kronecker-factored "
                        "Fisher, default)")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of the targeted layers' parameters to remove, in (0, 1) "
                        "(default 0.2)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="per-layer ranks: uniform (every layer loses --ratio, default), "
                        "spectrum (one global budget spent where the metric predicts the "
                        "least loss per parameter; some layers may stay dense) or search "
                        "(evolutionary search from spectrum, fitness = KL to the dense model "
                        "on held-out calibration windows)")
    p.add_argument("--search-generations", type=int, default=None,
                   help="search: most generations (default 50)")
    p.add_argument("--search-seconds", type=float, default=None,
                   help="search: time limit in seconds (default none)")
    p.add_argument("--search-windows", type=int, default=None,
                   help="search: calibration windows held out as fitness data (default 4)")
    p.add_argument("--min-rank", type=int, default=None,
                   help="smallest rank the spectrum allocation may give a layer (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="reach the ratio in this many stages, re-collecting statistics on the "
                        "partly compressed model before each (default 1: one cut)")
    p.add_argument("--sequential", action="store_true", default=None,
                   help="cut block by block, each block's input statistics re-measured on the "
                        "outputs of the blocks already cut (whiten, kfac)")
    p.add_argument("--include", help="regex: only target linear layers whose name matches")
    p.add_argument("--exclude", help="regex: skip linear layers whose name matches")
    p.add_argument("--damping", type=float, default=None,
                   help=f"relative eigenvalue damping of covariances (default {DEFAULT_DAMPING})")
    p.add_argument("--calib-text", help="calibration text file (default: the shipped "
                                        "WikiText-2 validation split)")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="number of calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=None, help="seed for windows and sampled labels (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--config", help="YAML recipe with any of these options; "
                                    "options given on the command line win")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.set_defaults(run=_compress)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and divergence from the dense model",
                       description="Perplexity on WikiText-2 test (non-overlapping windows) and, "
                                   "against a reference (dense) model, the KL divergence and "
                                   "top-1 agreement of next-token predictions.")
    p.add_argument("model", nargs="?", help="rankwise output folder, HF folder or .gguf file "
                                            "(default: the embedded model)")
    p.add_argument("--reference", help="dense model to compare with (default: the model a "
                                       "rankwise output was compressed from; 'none' to skip)")
    p.add_argument("--text", help="evaluation text file (default: shipped WikiText-2 test split)")
    p.add_argument("--windows", type=int, default=40, help="number of windows (default 40)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--full", action="store_true", help="evaluate on the whole text")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--ranks", action="store_true", help="also print the per-layer ranks")
    p.set_defaults(run=_eval)


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune under a rank constraint (factors, hard, svt)",
                       description="Train a model down to a parameter budget: one-shot "
                                   "compression then training the factors (factors), dense "
                                   "training with periodic hard truncation (hard, TRP), or "
                                   "proximal gradient with singular value soft-thresholding "
                                   "(svt). The LLM trains on WikiText-2 validation minus a "
                                   "held-out calibration part and is saved to --out; an image "
                                   "task first trains its dense MLP.")
    p.add_argument("--task", choices=("lm", *DATASETS), default="lm",
                   help="lm (a causal LM, default) or an image data set (digits, mnist)")
    p.add_argument("--model", help="lm: Hugging Face folder or .gguf (default: embedded model)")
    p.add_argument("--method", choices=METHODS, default=None, help="factors | hard | svt (default svt)")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of the targeted layers' parameters removed at the end (default 0.5)")
    p.add_argument("--metric", choices=PROX_METRICS, default=None,
                   help="metric of projections and proximal steps: svd (Euclidean), whiten, "
                        "kfac (default)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps in all (default 200)")
    p.add_argument("--prox-every", type=int, default=None,
                   help="steps between proximal steps / truncations (default 10)")
    p.add_argument("--recovery-steps", type=int, default=None,
                   help="final steps training the exact factors (hard, svt; default 40)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adamw (default) or sgd")
    p.add_argument("--momentum", type=float, default=None, help="sgd momentum (default 0)")
    p.add_argument("--lam", type=float, default=None,
                   help="svt: fixed nuclear-norm weight (default: a controller that reaches "
                        "the budget on a cubic schedule)")
    p.add_argument("--shrink", choices=SHRINKS, default=None,
                   help="svt: soft (every singular value loses tau; the nuclear norm's prox, "
                        "default), reweighted (s - tau^2/s: the same directions vanish, "
                        "large ones barely move) or firm (0 up to tau, 2(s - tau) up to 2 tau, "
                        "s above: the minimax concave penalty's prox)")
    p.add_argument("--penalty", choices=PENALTIES, default=None,
                   help="svt: nuclear (one threshold for every layer, default) or weighted "
                        "(layer thresholds scaled by sqrt(m+n): directions go in order of "
                        "metric loss per parameter, as in the final cut)")
    p.add_argument("--min-rank", type=int, default=None, help="smallest rank of a layer (default 1)")
    p.add_argument("--include", help="regex: only target linear layers whose name matches")
    p.add_argument("--exclude", help="regex: skip linear layers whose name matches")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows (lm, default 2) or images (default 128) per step")
    p.add_argument("--seqlen", type=int, default=256, help="lm: tokens per training window (default 256)")
    p.add_argument("--calib-samples", type=int, default=16,
                   help="lm: calibration windows from the held-out part (default 16)")
    p.add_argument("--calib-seqlen", type=int, default=512,
                   help="lm: tokens per calibration and test window (default 512)")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="lm: final fraction of the training text kept for calibration (default 0.2)")
    p.add_argument("--text", help="lm: training text (default: shipped WikiText-2 validation split)")
    p.add_argument("--eval-windows", type=int, default=40, help="lm: test windows (default 40)")
    p.add_argument("--pretrain-epochs", type=int, default=15,
                   help="images: epochs training the dense MLP first (default 15)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto (cuda when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of batches and sampled labels (default 0)")
    p.add_argument("--checkpoint", help="checkpoint file, written every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, default=50, help="(default 50)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--config", help="YAML recipe with any of these options")
    p.add_argument("--out", required=True, help="output folder: model (lm), training.png, history.json")
    p.set_defaults(run=_finetune)


def _finetune(args) -> None:
    from .plots import training_curves
    from .train import FinetuneConfig, finetune, history_json

    recipe = _recipe(args)
    known = set(FinetuneConfig.__dataclass_fields__)
    unknown = set(recipe) - known - set(vars(args))
    if unknown:
        raise RankwiseError(f"unknown fine-tuning option(s) {sorted(unknown)}; accepted: {sorted(known)}")
    if args.task != "lm":
        recipe.setdefault("lr", 1e-3)     # Adam on a small MLP, not on a pretrained LLM
    config = FinetuneConfig(**{k: v for k, v in recipe.items() if k in known})
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RankwiseError("--device cuda was asked for but no GPU is available")
    build = _lm_finetune if args.task == "lm" else _image_finetune
    model, task, finish = build(args, config, device)
    from .models import target_linears
    result = finetune(model, task, config, target_linears(model, config.include, config.exclude),
                      checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                      resume=args.resume)
    out = finish(model, result)
    (out / "history.json").write_text(history_json(result))
    training_curves(result.history, result.shapes, out / "training.png",
                    f"{config.method}, {config.metric}, ratio {result.achieved_ratio:.3f}")
    print(f"{config.method}: {config.steps} steps, removed {result.achieved_ratio:.4f} of the "
          f"targeted parameters (requested {config.ratio}) in {result.seconds:.0f} s -> {out}")


def _lm_finetune(args, config, device):
    from .data import (CALIBRATION_TEXT, EVALUATION_TEXT, calibration_windows,
                       evaluation_windows, read_text, tokenize)
    from .evaluate import evaluate, reference_log_probs
    from .io import save
    from .models import load_model
    from .train import LanguageTask

    if not 0 < args.holdout < 1:
        raise RankwiseError(f"--holdout must be in (0, 1), got {args.holdout}")
    text = read_text(args.text or CALIBRATION_TEXT)
    test_text = read_text(EVALUATION_TEXT)
    model, tokenizer, source = load_model(args.model)
    ids = tokenize(tokenizer, text)
    split = int(ids.numel() * (1 - args.holdout))
    calib = calibration_windows(ids[split:], args.calib_samples, args.calib_seqlen, args.seed,
                                what="the held-out calibration part of the text")
    task = LanguageTask(ids[:split], calib, args.batch_size or 2, args.seqlen, config.steps, args.seed)
    test = evaluation_windows(tokenize(tokenizer, test_text), args.calib_seqlen, args.eval_windows)
    ref = reference_log_probs(model, test)
    model.to(device)

    def finish(model, result):
        report = evaluate(model.cpu(), test, ref)
        print(f"test perplexity {report.perplexity:.3f} (dense {report.reference_perplexity:.3f}), "
              f"KL(dense || model) {report.kl:.4f}, top-1 agreement {report.top1_agreement:.4f}")
        manifest = {"source_model": source, "finetune": {**config.__dict__},
                    "achieved_ratio": result.achieved_ratio,
                    "targeted_params": {"dense": result.dense_params, "compressed": result.final_params},
                    "evaluation": {"perplexity": report.perplexity, "kl": report.kl,
                                   "dense_perplexity": report.reference_perplexity},
                    "seconds": {"total": result.seconds}}
        return save(model, args.out, manifest, tokenizer)
    return model, task, finish


def _image_finetune(args, config, device):
    from pathlib import Path

    from .train import ImageTask
    from .vision import accuracy, build_model, fit, load_images

    data = load_images(args.task, seed=args.seed)
    model = build_model("mlp", data, seed=args.seed)
    fit(model, data, args.pretrain_epochs, torch.optim.Adam(model.parameters(), lr=1e-3),
        seed=args.seed)
    dense_acc = accuracy(model, data.x_test, data.y_test)
    model.to(device)
    task = ImageTask(data, args.batch_size or 128, config.steps, args.seed)

    def finish(model, result):
        acc = accuracy(model.cpu(), data.x_test, data.y_test)
        print(f"test accuracy {acc:.4f} (dense {dense_acc:.4f})")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        return out
    return model, task, finish


def _dln_parser(sub) -> None:
    p = sub.add_parser("dln", help="deep linear networks vs their compressed form (C-DLN)",
                       description="Low-dimensional learning dynamics: train a wide deep linear "
                                   "network and a compressed one (narrow, spectral init, faster "
                                   "outer layers) on low-rank recovery, or carry the idea to an "
                                   "MLP / ViT on real digits.")
    p.add_argument("experiment", choices=("recover", "subspace", "transfer"),
                   help="recover: error vs iteration and time, DLN vs C-DLN (curves.png); "
                        "subspace: where the wide DLN's updates live (subspace.png); "
                        "transfer: an MLP or ViT and its compressed version on images")
    p.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS),
                   help="recovery problems (recover; subspace uses the first)")
    p.add_argument("--d", type=int, default=100, help="target size d x d (default 100)")
    p.add_argument("--rank", type=int, default=5, help="target rank r (default 5)")
    p.add_argument("--depth", type=int, default=3, help="number of layers L (default 3)")
    p.add_argument("--width", type=int, default=None,
                   help="compressed width r_hat (default 2r for recovery, 64 for transfer)")
    p.add_argument("--eps", type=float, default=1e-3, help="initialisation scale (default 1e-3)")
    p.add_argument("--lr", type=float, default=None,
                   help="base learning rate (default 0.2 for recovery, 1e-3 Adam for transfer)")
    p.add_argument("--alpha", type=float, default=None,
                   help="outer layers' learning-rate multiplier (default 4 recovery, 2 transfer)")
    p.add_argument("--iterations", type=int, default=30000, help="most iterations (default 30000)")
    p.add_argument("--tol", type=float, default=1e-3, help="target relative error (default 1e-3)")
    p.add_argument("--measurements", type=int, default=None,
                   help="sensing: Gaussian measurements (default 3 d r)")
    p.add_argument("--observed", type=float, default=0.3,
                   help="completion: observed fraction of entries (default 0.3)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="observation noise std, relative to the observations' RMS (default 0)")
    p.add_argument("--data", choices=DATASETS, default="mnist", help="transfer: image data set")
    p.add_argument("--model", choices=tuple(WIDE_LAYERS), default="mlp", help="transfer: network")
    p.add_argument("--epochs", type=int, default=20, help="transfer: training epochs (default 20)")
    p.add_argument("--warmup-steps", type=int, default=20,
                   help="transfer: wide-model steps before the spectral init (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--out", default="out/dln", help="folder for the PNGs (default out/dln)")
    p.set_defaults(run=_dln)


def _dln(args) -> None:
    from pathlib import Path

    from . import dln, plots
    out = Path(args.out)
    if args.experiment == "transfer":
        return _transfer(args)
    width = args.width or 2 * args.rank
    lr, alpha = args.lr or 0.2, args.alpha or 4.0
    problems = {name: dln.make_problem(name, args.d, args.rank, measurements=args.measurements,
                                       observed_fraction=args.observed, noise=args.noise,
                                       seed=args.seed)
                for name in (args.problems if args.experiment == "recover" else args.problems[:1])}
    if args.experiment == "subspace":
        name, problem = next(iter(problems.items()))
        trace, record = dln.track_subspace(problem, args.depth, args.eps, lr, args.iterations,
                                           args.tol, seed=args.seed)
        path = plots.subspace_figure(record, args.rank, out / "subspace.png",
                                     f"wide DLN updates, {name}, d={args.d}, r={args.rank}")
        ranks = record.effective_rank()[-1]
        print(f"{name}: error {trace.final_error:.2e} after {trace.iterations[-1]} iterations; "
              f"rank of each layer's update (singular values > 1e-3 x largest): {ranks} "
              f"(2r = {2 * args.rank}, d = {args.d}); largest principal angle to the target's "
              f"subspaces: first layer {record.angle_right[-1]:.2f} deg, last layer "
              f"{record.angle_left[-1]:.2f} deg -> {path}")
        return
    rows, runs = [], {}
    for name, problem in problems.items():
        wide, compressed = dln.run_pair(problem, args.depth, width, args.eps, lr, alpha,
                                        args.iterations, args.tol, seed=args.seed)
        rows += [(name, wide), (name, compressed)]
        runs[name] = [wide, compressed]
        worse = dln.dominated_records(wide, compressed)
        if worse:
            log.warning("%s: the C-DLN's error is above the DLN's at %d logged iterations "
                        "(first at %d)", name, len(worse), worse[0][0])
    print(dln.table(rows, args.tol))
    path = plots.recovery_curves(runs, out / "curves.png",
                                 f"d={args.d}, r={args.rank}, L={args.depth}, r_hat={width}, "
                                 f"eps={args.eps}, lr={lr}, alpha={alpha}")
    print(f"-> {path}")


def _transfer(args) -> None:
    from .transfer import run_transfer
    from .vision import load_images

    data = load_images(args.data, seed=args.seed)
    original, compressed = run_transfer(data, args.model, width=args.width or 64,
                                        epochs=args.epochs, warmup_steps=args.warmup_steps,
                                        alpha=args.alpha or 2.0, lr=args.lr or 1e-3,
                                        depth=args.depth, seed=args.seed)
    print(f"{args.model} on {args.data} ({len(data.y_train)} train / {len(data.y_test)} test images)")
    print(f"{'network':22s} {'test acc':>8s} {'params':>9s} {'wide-layer params':>17s} "
          f"{'s/epoch':>8s} {'train s':>8s}")
    for r in (original, compressed):
        print(f"{r.network:22s} {r.accuracy:8.4f} {r.params:9d} {r.wide_params:17d} "
              f"{r.seconds_per_epoch:8.3f} {r.train_seconds:8.1f}")


def _recipe(args) -> dict:
    """Options from --config, overridden by those given on the command line."""
    recipe = read_yaml(args.config) if args.config else {}
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "run", "command", "verbose"):
            recipe[key] = value
    return recipe


def _compress(args) -> None:
    from . import compress_, save
    from .plots import rank_chart
    from .data import CALIBRATION_TEXT, calibration_windows, read_text, tokenize
    from .models import load_model

    recipe = _recipe(args)
    calib = {k: int(recipe.pop(k, v)) for k, v in CALIB_DEFAULTS.items()}
    calib_text = recipe.pop("calib_text", None)
    model_spec, out = recipe.pop("model", None), recipe.pop("out")
    batch_size = int(recipe.pop("batch_size", 4))
    config = CompressConfig.from_dict(recipe)
    text = read_text(calib_text or CALIBRATION_TEXT)   # fail on bad text before a slow load
    model, tokenizer, source = load_model(model_spec)
    windows = calibration_windows(tokenize(tokenizer, text), calib["calib_samples"],
                                  calib["seqlen"], calib["seed"])
    summary = compress_(model, config, windows, batch_size=batch_size, seed=calib["seed"])
    manifest = {
        "source_model": source,
        "config": config.to_dict(),
        "achieved_ratio": summary.achieved_ratio,
        "targeted_params": {"dense": summary.dense_params, "compressed": summary.compressed_params},
        "calibration": {"text": str(calib_text or "wikitext-2 validation (shipped)"),
                        "windows": calib["calib_samples"], "seqlen": calib["seqlen"],
                        "seed": calib["seed"], "tokens": summary.calibration_tokens},
        "seconds": summary.seconds,
    }
    if summary.search is not None:
        manifest["search"] = {"seed_kl": summary.search.seed_fitness, "kl": summary.search.fitness,
                              "generations": summary.search.generations,
                              "evaluations": summary.search.evaluations}
    folder = save(model, out, manifest, tokenizer)
    rank_chart(summary.ranks, summary.shapes, folder / "ranks.png",
               f"{config.metric}, {config.allocation}, ratio {summary.achieved_ratio:.3f}")
    kept = sum(r is not None for r in summary.ranks.values())
    print(f"compressed {kept}/{len(summary.ranks)} layers with {config.metric}: removed "
          f"{summary.achieved_ratio:.4f} of the targeted parameters (requested {config.ratio}) "
          f"in {summary.seconds['total']:.1f} s -> {out}")


def _eval(args) -> None:
    from .data import EVALUATION_TEXT, evaluation_windows, read_text, tokenize
    from .evaluate import evaluate, parameter_count
    from .io import read_manifest
    from .models import DEFAULT_MODEL_NAME, load_model

    text = read_text(args.text or EVALUATION_TEXT)
    model, tokenizer, source = load_model(args.model)
    manifest = read_manifest(args.model) if args.model and _is_output(args.model) else None
    # default reference: the model a rankwise output was compressed from
    ref_spec = args.reference
    if ref_spec is None and manifest is not None:
        origin = manifest.get("source_model")
        reference = load_model(None if origin == DEFAULT_MODEL_NAME else origin)[0]
    elif ref_spec is not None and ref_spec.lower() != "none":
        reference = load_model(ref_spec)[0]
    else:
        reference = None
    windows = evaluation_windows(tokenize(tokenizer, text), args.seqlen,
                                 None if args.full else args.windows)
    report = evaluate(model, windows, reference, batch_size=args.batch_size)
    print(f"evaluated {source} on {report.tokens} predicted tokens "
          f"({windows.shape[0]} windows x {windows.shape[1]})")
    if reference is not None:
        print(f"  dense perplexity       {report.reference_perplexity:10.3f}  "
              f"({parameter_count(reference):,} parameters)")
    print(f"  perplexity             {report.perplexity:10.3f}  ({parameter_count(model):,} parameters)")
    if reference is not None:
        print(f"  KL(dense || model)     {report.kl:10.4f}  nats/token")
        print(f"  top-1 agreement        {report.top1_agreement:10.4f}")
    if args.ranks and manifest is not None:
        print("  per-layer ranks:")
        for name, rank in manifest["ranks"].items():
            print(f"    {name:50s} {rank}")


def _is_output(path: str) -> bool:
    from pathlib import Path

    from .io import MANIFEST
    return (Path(path) / MANIFEST).exists()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _compress_parser(sub)
    _eval_parser(sub)
    _finetune_parser(sub)
    _dln_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    try:
        args.run(args)
    except RankwiseError as e:
        print(f"rankwise: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
