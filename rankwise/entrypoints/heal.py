"""heal_model: distil a compressed rankwise output back toward its dense teacher."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..data import mixture_windows, parse_sources
from ..errors import RankwiseError
from ..io import check_output_folder, is_output, open_model, read_manifest, save
from ..models import DEFAULT_MODEL_NAME, DEVICES, load_model, model_path, resolve_device
from ..options import check_int, option
from ..train.config import check_resume
from ..train.distill import DistillTask
from ..train.heal import HealConfig, HealResult, heal


@dataclass
class HealRun:
    """Which compressed model to heal, against which teacher, on what text."""
    model: str | None = option(None, "the rankwise output folder to heal", positional=True,
                               required=True)
    out: str | None = option(None, "output folder (an ordinary rankwise output)", required=True)
    teacher: str | None = option(None, "dense teacher (default: the model the output was "
                                       "compressed from)")
    calib: list[str] | None = option(None, "training text sources NAME[:WEIGHT] (default: "
                                           "the output's calibration sources)", metavar="SOURCE")
    windows: int = option(128, "distinct training windows drawn from the sources")
    seqlen: int = option(512, "tokens per window")
    seed: int = option(0, "seed of the windows and of the batch order")
    device: str = option("cpu", f"where to train: {DEVICES}")
    checkpoint: str | None = option(None, "checkpoint file, written every --checkpoint-every "
                                          "steps and at the end")
    checkpoint_every: int = option(50, "steps between checkpoints")
    resume: bool = option(False, "continue from --checkpoint")

    def __post_init__(self):
        check_int("windows", self.windows)
        check_int("seqlen", self.seqlen, 2)
        check_int("seed", self.seed, 0)
        check_int("checkpoint_every", self.checkpoint_every)
        resolve_device(self.device)
        check_resume(self.checkpoint, self.resume)


@dataclass
class HealOutcome:
    folder: Path
    result: HealResult


def heal_model(run: HealRun, config: HealConfig, progress: bool = True) -> HealOutcome:
    """Heal the rankwise output run.model against its teacher and save it to run.out."""
    folder = check_output_folder(run.out)
    model_path(run.model)
    if not is_output(run.model):
        raise RankwiseError(f"{run.model} is not a rankwise output; heal a compressed model")
    manifest = read_manifest(run.model)
    teacher_spec = run.teacher
    if teacher_spec is None:
        origin = manifest.get("source_model")
        teacher_spec = None if origin == DEFAULT_MODEL_NAME else origin
    model_path(teacher_spec)
    specs = run.calib or [s["source"] for s in manifest.get("calibration", {}).get("sources", [])] \
        or ["wikitext"]
    sources = parse_sources(specs)
    device = resolve_device(run.device)
    student, tokenizer, _, _ = open_model(run.model)
    teacher = load_model(teacher_spec)[0].to(device)
    windows, drawn = mixture_windows(sources, tokenizer, teacher, run.windows, run.seqlen,
                                     run.seed + 1000, progress=progress)
    task = DistillTask(teacher, windows, windows[:0], config.batch_size, config.steps, run.seed,
                       topk=config.teacher_topk or None, progress=progress)
    student.to(device)
    result = heal(student, task, config, run.checkpoint, run.checkpoint_every, run.resume,
                  progress)
    record = {**manifest, "heal": {**asdict(config), "sources": drawn, "steps_done": result.steps,
                                   "seconds": result.seconds,
                                   "kl_first": result.losses[0] if result.losses else None,
                                   "kl_last": result.losses[-1] if result.losses else None,
                                   "trained_params": result.trained_params}}
    return HealOutcome(save(student.cpu(), folder, record, tokenizer), result)
