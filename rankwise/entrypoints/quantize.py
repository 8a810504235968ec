"""quantize_output: round an existing rankwise output, in its own metric, and save it as a
new output: its layers as they are at --factor-bits, or every layer given the form a
budget in --bits buys among those its form allows (a factored layer stays factors, of
its rank or lower). The same compression as `rankwise compress` (rankwise.cut.plans), anchored
to the output as it was given."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cut.compress import Execution, check_compressible, compress_
from ..cut.config import CompressConfig
from ..data.windows import Draw, mixture_windows, parse_sources
from ..errors import RankwiseError
from ..formats.atomic import Output
from ..formats.folder import is_output, open_model, read_manifest, write_model
from ..formats.loading import model_path
from ..formats.manifest import Manifest
from ..formats.storage import StorageConfig
from ..forms.grids import DEFAULT_WEIGHT_BITS, GROUP_SIZES, ROUNDINGS, WEIGHT_BITS
from ..models.host import fix_mmap_threshold, resolve_device
from ..options import check_int, option


@dataclass
class QuantizeRun:
    """Which output to quantize, where the result goes, what the rounding measures on."""
    model: str | None = option(None, "the rankwise output folder to round",
                               positional=True, required=True)
    out: str | None = option(None, "output folder (written atomically)", required=True)
    calib: list[str] | None = option(None, "text sources NAME[:WEIGHT] the statistics are "
                                           "measured on (default: the output's calibration "
                                           "sources but self)", metavar="SOURCE")
    windows: int = option(32, "calibration windows")
    seqlen: int = option(512, "tokens per window")
    batch_size: int = option(4, "windows per forward pass")
    seed: int = option(0, "seed of the windows")
    device: str = option("cpu", "where the rounding runs")

    def __post_init__(self):
        for name in ("windows", "batch_size"):
            check_int(name, getattr(self, name))
        check_int("seqlen", self.seqlen, 2)
        check_int("seed", self.seed, 0)
        resolve_device(self.device)


@dataclass
class QuantizeConfig:
    """What the output becomes: one of a budget in bits or a width for its factors."""
    bits: float | None = option(None, "the budget in stored bits per original targeted "
                                      "parameter; each layer takes the form that costs least "
                                      "in the K-FAC metric among those its form allows")
    factor_bits: int | None = option(None, "round the layers as they are: factors to "
                                           "integers (8 bits per row, fewer in groups), dense "
                                           "layers to the same", choices=WEIGHT_BITS)
    weight_bits: list[int] = option(help="with --bits: the widths a rounded weight may take",
                                    factory=lambda: list(DEFAULT_WEIGHT_BITS),
                                    choices=WEIGHT_BITS)
    group_size: int = option(64, "inputs per scale below 8 bits", choices=GROUP_SIZES)
    rounding: str = option("gptq", "how weights and factors are rounded: " + "; ".join(
        f"{k} = {v}" for k, v in ROUNDINGS.items()), choices=ROUNDINGS)

    def compression(self) -> CompressConfig:
        """The compression this is (validated as any recipe is)."""
        if (self.bits is None) == (self.factor_bits is None):
            raise RankwiseError("give one of --bits (a budget) or --factor-bits (a width)")
        return CompressConfig(metric="kfac", cut="anchored",
                              ratio=0.0 if self.factor_bits is not None else None,
                              bits=self.bits, factor_bits=self.factor_bits,
                              weight_bits=self.weight_bits, group_size=self.group_size,
                              rounding=self.rounding)

    def __post_init__(self):
        self.compression()


def quantize_output(run: QuantizeRun, config: QuantizeConfig, storage: StorageConfig,
                    progress: bool = True) -> tuple[Path, Manifest]:
    """Round run.model as `config` says and write the result to run.out; returns the
    folder and its manifest."""
    model_path(run.model)
    if not is_output(run.model):
        raise RankwiseError(f"{run.model} is not a rankwise output; compress a model first "
                            "(or use rankwise compress --bits / --factor-bits)")
    compression = config.compression()
    manifest = read_manifest(run.model)
    out = Output(run.out, "quantize", inputs=[run.model])
    fix_mmap_threshold()         # resident memory flat over the walks (models.py says why)
    model, tokenizer, _, _ = open_model(run.model)
    check_compressible(model)
    stored = manifest.storage.dtype if manifest.storage else "bfloat16"
    dtype = getattr(torch, stored if storage.save_dtype == "auto" else storage.save_dtype)
    # `self` is left out: it would sample the compressed model, not the dense one
    specs = run.calib or [s["source"] for s in (manifest.calibration or {}).get("sources", [])]
    sources = parse_sources([s for s in specs if s != "self"] or ["wikitext"])
    windows, _ = mixture_windows(sources, tokenizer, model,
                                 Draw(run.windows, run.seqlen, run.seed), progress=progress)
    model.to(resolve_device(run.device))
    summary = compress_(model, compression, windows, progress=progress, scale_dtype=dtype,
                        execution=Execution(batch_size=run.batch_size, seed=run.seed))
    recorded = summary.recorded(compression)
    recorded.pop("seconds")            # the compression's own times stay; decompositions too
    recorded.pop("decompositions")
    record = dataclasses.replace(manifest, quantized=compression.to_dict(), **recorded)
    with out.writing() as tmp:
        record = write_model(tmp, model.cpu(), record, tokenizer, dtype)
    return out.path, record
