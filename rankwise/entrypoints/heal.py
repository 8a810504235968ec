"""heal_model: distil a compressed rankwise output back toward its dense teacher."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.windows import Draw, mixture_windows, parse_sources
from ..errors import RankwiseError
from ..formats.atomic import Output
from ..formats.cache import Cache
from ..formats.folder import dense_source, is_output, open_model, read_manifest, write_model
from ..formats.loading import load_model, model_path
from ..models.host import resolve_device
from ..options import check_int, option
from ..train.config import TrainingRun
from ..train.distill import DistillTask
from ..train.heal import HealConfig, HealResult, heal


@dataclass
class HealRun(TrainingRun):
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

    def __post_init__(self):
        super().__post_init__()
        check_int("windows", self.windows)
        check_int("seqlen", self.seqlen, 2)


@dataclass
class HealOutcome:
    folder: Path
    result: HealResult


def heal_model(run: HealRun, config: HealConfig, progress: bool = True) -> HealOutcome:
    """Heal the rankwise output run.model against its teacher and save it to run.out."""
    model_path(run.model)
    if not is_output(run.model):
        raise RankwiseError(f"{run.model} is not a rankwise output; heal a compressed model")
    manifest = read_manifest(run.model)
    teacher_spec = run.teacher if run.teacher is not None else dense_source(manifest)
    out = Output(run.out, "heal", inputs=[run.model, model_path(teacher_spec)])
    specs = run.calib or [s["source"] for s in (manifest.calibration or {}).get("sources", [])] \
        or ["wikitext"]
    sources = parse_sources(specs)
    device = resolve_device(run.device)
    cache = Cache(enabled=run.cache)
    student, tokenizer, _, _ = open_model(run.model)
    teacher = load_model(teacher_spec, cache=cache)[0].to(device)
    windows, drawn = mixture_windows(sources, tokenizer, teacher,
                                     Draw(run.windows, run.seqlen, run.seed + 1000),
                                     progress=progress, cache=cache,
                                     model_key=cache.digest(model_path(teacher_spec)) if run.cache else None)
    task = DistillTask(teacher, windows, windows[:0], config.batch_size, config.steps, run.seed,
                       topk=config.teacher_topk or None, progress=progress)
    student.to(device)
    result = heal(student, task, config, run.checkpoint, run.checkpoint_every, run.resume,
                  progress)
    record = dataclasses.replace(manifest, heal={
        **asdict(config), "sources": drawn, "steps_done": result.steps, "seconds": result.seconds,
        "kl_first": result.losses[0] if result.losses else None,
        "kl_last": result.losses[-1] if result.losses else None,
        "trained_params": result.trained_params})
    with out.writing() as tmp:
        write_model(tmp, student.cpu(), record, tokenizer)
    return HealOutcome(out.path, result)
