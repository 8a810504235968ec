"""finetune_model: train a causal LM down to a budget, evaluate it, save it."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.windows import (CALIBRATION_TEXT, EVALUATION_TEXT, calibration_windows,
                            evaluation_windows, read_text, tokenize)
from ..evaluation.plots import write_training_outputs
from ..evaluation.scoring import Report, evaluate, reference_log_probs
from ..formats.atomic import Output
from ..formats.cache import Cache
from ..formats.folder import write_model
from ..formats.loading import load_model, model_path
from ..formats.manifest import Manifest
from ..models.blocks import target_linears
from ..models.host import resolve_device
from ..options import check_choice, check_int, check_number, option
from ..train import FinetuneConfig, FinetuneResult, LanguageTask, finetune
from ..train.config import TrainingRun
from ..train.distill import DistillTask

OBJECTIVES = ("lm", "distill")


@dataclass
class FinetuneRun(TrainingRun):
    """What a fine-tuning run of a causal LM trains on, where it runs and what it keeps."""
    model: str | None = option(None, "Hugging Face folder or .gguf (default: the embedded "
                                     "SmolLM2-135M-Instruct)")
    text: str | None = option(None, "training text (default: the shipped WikiText-2 "
                                    "validation split)")
    batch_size: int = option(2, "windows per step")
    seqlen: int = option(256, "tokens per training window")
    objective: str = option("lm", "the training loss: lm (cross-entropy of the text) or "
                                  "distill (KL to the dense model's next-token distributions, "
                                  "so no domain adaptation enters the score)",
                            choices=OBJECTIVES)
    calib_samples: int = option(16, "calibration windows from the held-out part")
    calib_seqlen: int = option(512, "tokens per calibration and test window")
    holdout: float = option(0.2, "final fraction of the training text kept for calibration, "
                                 "in (0, 1)")
    eval_windows: int = option(40, "test windows")
    out: str | None = option(None, "output folder: the model, training.png, history.json",
                             required=True)

    def __post_init__(self):
        super().__post_init__()
        check_choice("objective", self.objective, OBJECTIVES)
        for name in ("batch_size", "calib_samples", "eval_windows"):
            check_int(name, getattr(self, name))
        check_int("seqlen", self.seqlen, 2)
        check_int("calib_seqlen", self.calib_seqlen, 2)
        self.holdout = check_number("holdout", self.holdout, 0, 1)


@dataclass
class FinetuneOutcome:
    folder: Path
    result: FinetuneResult
    report: Report


def training_task(run: FinetuneRun, model, tokenizer, steps: int, device: str):
    """The task a run trains on: the text minus its last `holdout` fraction, whose windows
    (the held-out part) are the calibration data; with the distill objective the loss is
    the KL to a copy of the dense model."""
    ids = tokenize(tokenizer, read_text(run.text or CALIBRATION_TEXT))
    split = int(ids.numel() * (1 - run.holdout))
    calib = calibration_windows(ids[split:], run.calib_samples, run.calib_seqlen, run.seed,
                                what="the held-out calibration part of the text")
    if run.objective == "distill":
        teacher = copy.deepcopy(model).to(device).eval()
        train = evaluation_windows(ids[:split], run.seqlen, what="the training part of the text")
        return DistillTask(teacher, train, calib, run.batch_size, steps, run.seed, progress=False)
    return LanguageTask(ids[:split], calib, run.batch_size, run.seqlen, steps, run.seed)


def finetune_model(run: FinetuneRun, config: FinetuneConfig,
                   progress: bool = True) -> FinetuneOutcome:
    """Fine-tune run.model on run.text minus its last `holdout` fraction (which holds the
    calibration windows) under `config`, evaluate it on WikiText-2 test against the dense
    model, and save it to run.out with history.json and training.png."""
    out = Output(run.out, "finetune", inputs=[model_path(run.model), run.text])
    device = resolve_device(run.device)
    model, tokenizer, source = load_model(run.model, cache=Cache(enabled=run.cache))
    test = evaluation_windows(tokenize(tokenizer, read_text(EVALUATION_TEXT)), run.calib_seqlen,
                              run.eval_windows)
    ref = reference_log_probs(model, test, progress=progress)
    task = training_task(run, model, tokenizer, config.steps, device)
    model.to(device)
    result = finetune(model, task, config, target_linears(model, config.include, config.exclude),
                      checkpoint=run.checkpoint, checkpoint_every=run.checkpoint_every,
                      resume=run.resume, progress=progress)
    report = evaluate(model.cpu(), test, ref, progress=progress)
    manifest = Manifest(source_model=source, finetune=asdict(result.config),
                        objective=run.objective, achieved_ratio=result.achieved_ratio,
                        targeted_params={"dense": result.dense_params,
                                         "compressed": result.final_params},
                        evaluation={"perplexity": report.perplexity, "kl": report.kl,
                                    "dense_perplexity": report.reference_perplexity},
                        seconds={"total": result.seconds})
    with out.writing() as tmp:
        write_model(tmp, model, manifest, tokenizer)
        write_training_outputs(result, tmp)
    return FinetuneOutcome(out.path, result, report)
