"""finetune_model: train a causal LM down to a budget, evaluate it, save it."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import (CALIBRATION_TEXT, EVALUATION_TEXT, calibration_windows, evaluation_windows,
                    read_text, tokenize)
from ..evaluate import Report, evaluate, reference_log_probs
from ..io import check_output_folder, save
from ..models import load_model, model_path, resolve_device, target_linears
from ..plots import training_curves
from ..train import FinetuneConfig, FinetuneResult, FinetuneRun, LanguageTask, finetune, history_json
from ..train.distill import DistillTask


@dataclass
class FinetuneOutcome:
    folder: Path
    result: FinetuneResult
    report: Report


def finetune_model(run: FinetuneRun, config: FinetuneConfig,
                   progress: bool = True) -> FinetuneOutcome:
    """Fine-tune run.model on run.text minus its last `holdout` fraction (which holds the
    calibration windows) under `config`, evaluate it on WikiText-2 test against the dense
    model, and save it to run.out with history.json and training.png."""
    folder = check_output_folder(run.out)
    model_path(run.model)
    device = resolve_device(run.device)
    text, test_text = read_text(run.text or CALIBRATION_TEXT), read_text(EVALUATION_TEXT)
    model, tokenizer, source = load_model(run.model)
    ids = tokenize(tokenizer, text)
    split = int(ids.numel() * (1 - run.holdout))
    calib = calibration_windows(ids[split:], run.calib_samples, run.calib_seqlen, run.seed,
                                what="the held-out calibration part of the text")
    test = evaluation_windows(tokenize(tokenizer, test_text), run.calib_seqlen, run.eval_windows)
    ref = reference_log_probs(model, test, progress=progress)
    if run.objective == "distill":
        teacher = copy.deepcopy(model).to(device).eval()
        train = evaluation_windows(ids[:split], run.seqlen, what="the training part of the text")
        task = DistillTask(teacher, train, calib, run.batch_size or 2, config.steps, run.seed,
                           progress=False)
    else:
        task = LanguageTask(ids[:split], calib, run.batch_size or 2, run.seqlen, config.steps,
                            run.seed)
    model.to(device)
    result = finetune(model, task, config, target_linears(model, config.include, config.exclude),
                      checkpoint=run.checkpoint, checkpoint_every=run.checkpoint_every,
                      resume=run.resume, progress=progress)
    report = evaluate(model.cpu(), test, ref, progress=progress)
    manifest = {"source_model": source, "finetune": asdict(result.config),
                "objective": run.objective,
                "achieved_ratio": result.achieved_ratio,
                "targeted_params": {"dense": result.dense_params, "compressed": result.final_params},
                "evaluation": {"perplexity": report.perplexity, "kl": report.kl,
                               "dense_perplexity": report.reference_perplexity},
                "seconds": {"total": result.seconds}}
    folder = save(model, folder, manifest, tokenizer)
    write_training_outputs(result, folder)
    return FinetuneOutcome(folder, result, report)


def write_training_outputs(result: FinetuneResult, folder: Path) -> None:
    """history.json (every step's record) and training.png (loss and ranks by step)."""
    c = result.config
    (folder / "history.json").write_text(history_json(result))
    training_curves(result.history, result.shapes, folder / "training.png",
                    f"{c.method}, {c.metric}, ratio {result.achieved_ratio:.3f}")
