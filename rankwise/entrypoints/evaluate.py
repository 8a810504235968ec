"""evaluate_model: a model (or rankwise output) against its dense reference on a text."""
from __future__ import annotations

from dataclasses import dataclass

from ..data import DOMAINS, evaluation_texts, evaluation_windows, tokenize
from ..evaluate import Report, evaluate, parameter_count
from ..io import is_output, open_model, read_manifest
from ..models import DEFAULT_MODEL_NAME, load_model, model_path
from ..options import check_bool, check_int, option


@dataclass
class EvalConfig:
    """What to evaluate, against what, on which text."""
    model: str | None = option(None, "rankwise output folder, HF folder or .gguf file "
                                     "(default: the embedded model)", positional=True)
    reference: str | None = option(None, "dense model to compare with (default: the model a "
                                         "rankwise output was compressed from; 'none' to skip)")
    text: list[str] = option(help="evaluation texts: shipped domains' evaluation parts "
                                  f"({', '.join(DOMAINS)}) or text files", factory=lambda: list(DOMAINS),
                             metavar="TEXT")
    windows: int = option(40, "number of windows")
    seqlen: int = option(512, "tokens per window")
    full: bool = option(False, "evaluate on the whole text")
    batch_size: int = option(4, "windows per forward pass")
    ranks: bool = option(False, "also print the per-layer ranks")

    def __post_init__(self):
        if isinstance(self.text, str):
            self.text = [self.text]
        check_int("windows", self.windows)
        check_int("seqlen", self.seqlen, 2)
        check_int("batch_size", self.batch_size)
        check_bool("full", self.full)
        check_bool("ranks", self.ranks)


@dataclass
class EvalOutcome:
    reports: dict[str, Report]           # per text
    windows: dict[str, tuple[int, int]]
    source: str
    params: int
    reference_params: int | None
    manifest: dict | None


def evaluate_model(config: EvalConfig, progress: bool = True) -> EvalOutcome:
    """Perplexity of config.model on each text and, against the reference, the KL of
    next-token distributions and top-1 agreement. Paths are checked before any load."""
    texts = evaluation_texts(config.text)
    model_path(config.model)
    manifest = read_manifest(config.model) if is_output(config.model) else None
    reference_spec, use_reference = config.reference, True
    if reference_spec is None and manifest is not None:
        origin = manifest.get("source_model")
        reference_spec = None if origin == DEFAULT_MODEL_NAME else origin
    elif reference_spec is None or reference_spec.lower() == "none":
        use_reference = False
    if use_reference:
        model_path(reference_spec)
    model, tokenizer, source, _ = open_model(config.model)
    reference = load_model(reference_spec)[0] if use_reference else None
    reports, shapes = {}, {}
    for name, text in texts.items():
        windows = evaluation_windows(tokenize(tokenizer, text), config.seqlen,
                                     None if config.full else config.windows, what=name)
        reports[name] = evaluate(model, windows, reference, batch_size=config.batch_size,
                                 progress=progress)
        shapes[name] = tuple(windows.shape)
    return EvalOutcome(reports, shapes, source, parameter_count(model),
                       parameter_count(reference) if reference is not None else None, manifest)
