"""Exports: a rankwise output written in another format, for runtimes that do not load the
output folder itself (which plain transformers already loads with trust_remote_code).

The registry holds each format's writer, `(model, tokenizer, folder) -> None`, which fills
an empty temporary folder; `export` checks the target (never the source), loads the
output, and writes through rankwise.outputs (atomic, replaced only whole and only when an
earlier export wrote it). A new format is one function and one registry entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from .errors import RankwiseError
from .io import is_output, open_model
from .layers import LowRankLinear, set_module
from .models import model_path
from .options import check_choice, option
from .outputs import Output


def write_dense(model: nn.Module, tokenizer, folder: Path) -> None:
    """A plain transformers checkpoint of the base architecture, every factor pair merged
    back into a dense weight (no remote code)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            set_module(model, name, module.merge())
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


@dataclass(frozen=True)
class Format:
    name: str
    write: Callable[[nn.Module, object, Path], None]
    help: str


FORMATS = {f.name: f for f in (
    Format("dense", write_dense, "a plain transformers checkpoint, factors merged back"),
)}


@dataclass
class ExportConfig:
    model: str | None = option(None, "the rankwise output folder to export", positional=True,
                               required=True)
    out: str | None = option(None, "the folder to write (written atomically; never the source)",
                             required=True, aliases=("dense",))
    format: str = option("dense", "; ".join(f"{f.name} = {f.help}" for f in FORMATS.values()),
                         choices=FORMATS)

    def __post_init__(self):
        check_choice("format", self.format, FORMATS)


def export(config: ExportConfig) -> Path:
    """Write the rankwise output config.model in config.format to config.out."""
    model_path(config.model)
    if not is_output(config.model):
        raise RankwiseError(f"{config.model} is not a rankwise output; export writes one in "
                            "another format")
    out = Output(config.out, f"export --format {config.format}", inputs=[config.model])
    model, tokenizer, _, _ = open_model(config.model, need_tokenizer=False)
    with out.writing() as tmp:
        FORMATS[config.format].write(model, tokenizer, tmp)
    return out.path
