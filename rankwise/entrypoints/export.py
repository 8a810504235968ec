"""export: a rankwise output written in another format (rankwise.formats.exports), checked
before any load and written atomically."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import RankwiseError
from ..formats.atomic import Output
from ..formats.exports import FORMATS
from ..formats.folder import is_output, open_model
from ..formats.loading import model_path
from ..options import check_choice, option


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
    model, tokenizer, _, manifest = open_model(config.model, need_tokenizer=False)
    with out.writing() as tmp:
        FORMATS[config.format].write(model, tokenizer, manifest, tmp)
    return out.path
