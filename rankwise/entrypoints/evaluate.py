"""evaluate_model: a model (or rankwise output) against its dense reference on a text."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from ..data.windows import DOMAINS, evaluation_texts, evaluation_windows, tokenize
from ..evaluation.scoring import (HeadInputs, Report, evaluate, head_inputs_of,
                                  head_reproduces, parameter_count)
from ..evaluation.speed import measure_speed
from ..evaluation.tasks import STANDARD_ZERO_SHOT, check_tasks, run_tasks
from ..formats.atomic import write_file
from ..formats.cache import Cache
from ..formats.folder import (EVAL_FILE, MANIFEST, WEIGHTS, dense_source, is_output,
                              open_model, read_manifest)
from ..formats.loading import DTYPES, load_model, model_path
from ..formats.manifest import Manifest, StorageRecord
from ..models.host import DEVICES, release_host_memory, resolve_device
from ..options import check_bool, check_choice, check_int, option
from ..version import __version__

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """What to evaluate, against what, on which text."""
    model: str | None = option(None, "rankwise output folder, HF folder or .gguf file "
                                     "(default: the embedded model)", positional=True)
    reference: str | None = option(None, "dense model to compare with (default: the model a "
                                         "rankwise output was compressed from; 'none' to skip)")
    text: list[str] = option(help="evaluation texts: shipped domains' evaluation parts "
                                  f"({', '.join(DOMAINS)}) or text files; none to skip "
                                  "perplexity", factory=lambda: list(DOMAINS), metavar="TEXT")
    windows: int = option(40, "number of windows")
    seqlen: int = option(512, "tokens per window")
    full: bool = option(False, "evaluate on the whole text")
    batch_size: int = option(4, "windows per forward pass")
    device: str = option("cpu", f"where the models run: {DEVICES}")
    dtype: str = option("float32", "the weights' dtype once loaded", choices=DTYPES)
    ranks: bool = option(False, "also print the per-layer ranks")
    tasks: list[str] = option(help="lm-evaluation-harness tasks to run on the model and its "
                                   "reference (pip install 'rankwise[lmeval]'), e.g. "
                                   + ",".join(STANDARD_ZERO_SHOT), factory=list, metavar="TASK")
    task_path: str | None = option(None, "folder of local lm-eval task YAML files")
    task_limit: int | None = option(None, "lm-eval: at most this many examples per task")
    num_fewshot: int | None = option(None, "lm-eval: few-shot examples (default: the task's)")
    speed: bool = option(False, "also measure generate speed (prefill and decode tokens/s, "
                                "eager) of the model and its reference")
    save: bool = option(True, "write the results to eval.json in a rankwise output folder "
                              "(rankwise report reads them)")
    cache: bool = option(True, "reuse a GGUF model converted by an earlier run from the "
                               "user's cache folder (--no-cache converts it afresh)")

    def __post_init__(self):
        if isinstance(self.text, str):
            self.text = [self.text]
        self.text = [] if [t.lower() for t in self.text] == ["none"] else self.text
        self.tasks = [t for item in ([self.tasks] if isinstance(self.tasks, str) else self.tasks)
                      for t in item.split(",") if t]
        if self.task_limit is not None:
            check_int("task_limit", self.task_limit)
        if self.num_fewshot is not None:
            check_int("num_fewshot", self.num_fewshot, 0)
        check_int("windows", self.windows)
        check_int("seqlen", self.seqlen, 2)
        check_int("batch_size", self.batch_size)
        for name in ("full", "ranks", "speed", "save", "cache"):
            check_bool(name, getattr(self, name))
        check_choice("dtype", self.dtype, DTYPES)
        resolve_device(self.device)


@dataclass
class EvalOutcome:
    reports: dict[str, Report]           # per text
    windows: dict[str, tuple[int, int]]
    source: str
    params: int
    reference_params: int | None
    manifest: Manifest | None
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)            # lm-eval
    reference_tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    speed: dict[str, float] = field(default_factory=dict)     # tokens/s; dense_* for the reference
    disk: dict[str, float] = field(default_factory=dict)      # a rankwise output's weights file

    def to_dict(self) -> dict:
        return {"source": self.source, "params": self.params, "disk": self.disk,
                "reference_params": self.reference_params,
                "texts": {name: {**asdict(r), "windows": list(self.windows[name])}
                          for name, r in self.reports.items()},
                "tasks": self.tasks, "reference_tasks": self.reference_tasks, "speed": self.speed}


def weights_on_disk(folder: Path, manifest: Manifest) -> dict[str, float]:
    """The weights file's bytes as the disk holds them, with what the manifest says they
    are (dtype, factors, bits per original targeted parameter; absent for older outputs)."""
    stored = manifest.storage or StorageRecord("float32")
    return {"bytes": (folder / WEIGHTS).stat().st_size, "dtype": stored.dtype,
            "grids": stored.grids, "bits_per_targeted_param": stored.bits_per_targeted_param}


def _content(cache: Cache, spec: str | None) -> str:
    """sha256 of what a model computes from: a rankwise output's weights and config (not
    the eval.json each evaluation writes beside them), any other model's files."""
    path = model_path(spec)
    if not is_output(spec):
        return cache.digest(path)
    return hashlib.sha256("".join(cache.digest(path / name) for name in
                                  (WEIGHTS, "config.json", MANIFEST)).encode()).hexdigest()


def _scored(model, windows: torch.Tensor, reference, keys: dict | None, config: EvalConfig,
            cache: Cache, progress: bool) -> Report:
    """The model's report on these windows: from the user's cache when an earlier run
    scored the same model content against the same reference on the same tokens (the
    numbers are a function of those), else measured and kept. `keys` None: no cache."""
    if keys is None:
        return evaluate(model, windows, reference, config.batch_size, progress)
    on = {**keys["reference"], "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
    report_key = {**on, "scored": keys["model"], "rankwise": __version__}
    folder = cache.get("report", report_key)
    kept = None if folder is None else cache.usable(
        lambda: Report(**json.loads((folder / "report.json").read_text())))
    if kept is not None:
        return kept
    report = _against_dense(model, windows, reference, on, config, cache, progress)
    cache.put("report", report_key,
              lambda folder: (folder / "report.json").write_text(json.dumps(asdict(report))))
    return report


def _against_dense(model, windows: torch.Tensor, reference, key: dict, config: EvalConfig,
                   cache: Cache, progress: bool) -> Report:
    """evaluate, with the dense reference's head inputs on these windows taken from the
    user's cache when an earlier run left them (keyed by the reference's content, the
    windows' tokens, the dtype and device kind), else recorded for the next run."""
    folder = cache.get("reference", key)
    inputs = None if folder is None else cache.usable(
        lambda: load_file(folder / "head_inputs.safetensors")["inputs"])
    if inputs is not None and tuple(inputs.shape[:2]) == tuple(windows.shape):
        return evaluate(model, windows, HeadInputs(reference.get_output_embeddings(), inputs),
                        config.batch_size, progress)
    with head_inputs_of(reference) as collected:
        report = evaluate(model, windows, reference, config.batch_size, progress)
    inputs = torch.cat(collected)
    if head_reproduces(reference, windows, inputs):
        cache.put("reference", key, lambda folder: save_file(
            {"inputs": inputs.contiguous()}, folder / "head_inputs.safetensors"))
    else:
        log.info("the reference changes its logits after its output head: it is run whole "
                 "at every evaluation")
    return report


def evaluate_model(config: EvalConfig, progress: bool = True) -> EvalOutcome:
    """Perplexity of config.model on each text and, against the reference, the KL of
    next-token distributions and top-1 agreement. Paths are checked before any load."""
    texts = evaluation_texts(config.text) if config.text else {}
    if config.tasks:
        check_tasks(config.tasks, config.task_path)
    model_path(config.model)
    manifest = read_manifest(config.model) if is_output(config.model) else None
    reference_spec, use_reference = config.reference, True
    if reference_spec is None and manifest is not None:
        reference_spec = dense_source(manifest)
    elif reference_spec is None or reference_spec.lower() == "none":
        use_reference = False
    if use_reference:
        model_path(reference_spec)
    device = resolve_device(config.device)
    cache = Cache(enabled=config.cache)
    model, tokenizer, source, _ = open_model(config.model, dtype=config.dtype, cache=cache)
    model.to(device)
    reference = load_model(reference_spec, config.dtype, cache)[0].to(device) \
        if use_reference else None
    keys = {"reference": {"model": cache.digest(model_path(reference_spec)),
                          "dtype": config.dtype, "device": torch.device(device).type,
                          "torch": torch.__version__, "transformers": transformers.__version__},
            "model": _content(cache, config.model)} if use_reference and cache.enabled else None
    reports, shapes = {}, {}
    for name, text in texts.items():
        windows = evaluation_windows(tokenize(tokenizer, text), config.seqlen,
                                     None if config.full else config.windows, what=name)
        release_host_memory()      # what tokenizing a whole text left in the allocator
        reports[name] = _scored(model, windows, reference, keys, config, cache, progress)
        shapes[name] = tuple(windows.shape)
    outcome = EvalOutcome(reports, shapes, source, parameter_count(model),
                          parameter_count(reference) if reference is not None else None, manifest)
    if manifest is not None:
        outcome.disk = weights_on_disk(Path(config.model), manifest)
    if config.tasks:
        run = dict(tasks=config.tasks, include_path=config.task_path, limit=config.task_limit,
                   num_fewshot=config.num_fewshot, batch_size=config.batch_size)
        outcome.tasks = run_tasks(model, tokenizer, **run)
        if reference is not None:
            outcome.reference_tasks = run_tasks(reference, tokenizer, **run)
    if config.speed:
        for prefix, net in (("", model), ("dense_", reference)):
            if net is not None:
                s = measure_speed(net)
                outcome.speed.update({f"{prefix}prefill": s.prefill_tokens_per_s,
                                      f"{prefix}decode": s.decode_tokens_per_s})
    if config.save and manifest is not None:
        write_file(Path(config.model) / EVAL_FILE, json.dumps(outcome.to_dict(), indent=2))
    return outcome
