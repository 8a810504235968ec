"""quantize_output: round the factors of an existing rankwise output onto an integer grid
(rankwise.quantize) and save it as a new output (rankwise.ct_format)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import StorageConfig
from ..ct_format import quantized_modules, require_package
from ..data import mixture_windows, parse_sources
from ..errors import RankwiseError
from ..io import is_output, open_model, read_manifest, write_model
from ..models import model_path, resolve_device
from ..options import check_int, option
from ..outputs import Output
from ..quantize import kept_dense, quantize_model


@dataclass
class QuantizeRun:
    """Which output to quantize, where the result goes, what the rounding measures on."""
    model: str | None = option(None, "the rankwise output folder whose factors to round",
                               positional=True, required=True)
    out: str | None = option(None, "output folder (written atomically)", required=True)
    calib: list[str] | None = option(None, "text sources NAME[:WEIGHT] the covariances are "
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


def quantize_output(run: QuantizeRun, storage: StorageConfig, progress: bool = True) -> dict:
    """Round run.model's factors as `storage` says and write the result to run.out;
    returns the new manifest."""
    model_path(run.model)
    if not is_output(run.model):
        raise RankwiseError(f"{run.model} is not a rankwise output; compress a model first "
                            "(or use rankwise compress --factor-bits)")
    grid = storage.grid()
    if grid is None:
        raise RankwiseError("--factor-bits is required: 8 or 4")
    require_package()
    manifest = read_manifest(run.model)
    out = Output(run.out, "quantize", inputs=[run.model])
    model, tokenizer, _, _ = open_model(run.model)
    if quantized_modules(model):
        raise RankwiseError(f"{run.model} already holds quantized factors; quantize the float "
                            "output it was made from")
    stored = manifest.get("storage", {}).get("dtype", "bfloat16")
    dtype = getattr(torch, stored if storage.save_dtype == "auto" else storage.save_dtype)
    # `self` is left out: it would sample the compressed model, not the dense one
    specs = run.calib or [s["source"] for s in manifest.get("calibration", {}).get("sources", [])]
    sources = parse_sources([s for s in specs if s != "self"] or ["wikitext"])
    windows, _ = mixture_windows(sources, tokenizer, model, run.windows, run.seqlen, run.seed,
                                 progress=progress)
    model.to(resolve_device(run.device))
    rounded = quantize_model(model, grid, windows, run.batch_size, dtype, storage.rounding,
                             kept_dense(model, manifest.get("config", {})))
    record = {**manifest, "factor_rounding": rounded.record(grid, storage.rounding)}
    with out.writing() as tmp:
        record = write_model(tmp, model.cpu(), record, tokenizer, dtype)
    return {"folder": out.path, **record}

