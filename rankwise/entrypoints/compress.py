"""compress_model: load, calibrate, compress, save with its manifest and rank chart."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..cut.compress import Execution, Summary, check_compressible, compress_
from ..cut.config import CompressConfig
from ..data.config import DEFAULT_CALIBRATION, CalibrationConfig
from ..data.windows import (Source, mixture_windows, parse_sources, sampling_bytes,
                            without_self, without_self_if_unsampleable)
from ..errors import RankwiseError
from ..evaluation.plots import rank_chart
from ..formats.atomic import Output
from ..formats.cache import Cache
from ..formats.folder import open_model, write_model
from ..formats.hf import base_model_type
from ..formats.loading import DTYPES, model_path, storage_dtype
from ..formats.manifest import Manifest
from ..formats.storage import StorageConfig
from ..models.host import DEVICES, fix_mmap_threshold, resolve_device
from ..options import check_bool, check_choice, check_number, option
from ..pipeline import distributed
from ..pipeline.placement import Placement
from ..serving.engines import serving_reports

log = logging.getLogger(__name__)


@dataclass
class CompressRun:
    """Which model to compress, where the result goes, where the work runs."""
    model: str | None = option(None, "Hugging Face model folder, .gguf file or rankwise output "
                                     "(default: the embedded SmolLM2-135M-Instruct)")
    out: str | None = option(None, "output folder (written atomically)", required=True)
    device: str = option("cpu", f"where compression runs: {DEVICES}")
    dtype: str = option("float32", "the weights' dtype once loaded", choices=DTYPES)
    onload: bool = option(False, "keep the model on the CPU and bring one block at a time to "
                                 "--device for statistics and projections (memory bounded by "
                                 "one block)")
    scratch: str | None = option(None, "folder for the temporary spill of activations and "
                                       "factors, about the size of the model's block weights "
                                       "(default: the system's temporary folder)")
    park_in_memory: float = option(0.0, "GiB of the activations and factors a compression "
                                        "parks that may stay in memory where they are (on "
                                        "the device that made them) before the rest goes to "
                                        "--scratch; 0: all to disk, memory flat in depth")
    cache: bool = option(True, "reuse what an earlier run computed (a GGUF model converted, "
                               "windows sampled for self calibration) from the user's cache "
                               "folder ($RANKWISE_CACHE, default ~/.cache/rankwise); "
                               "--no-cache computes everything afresh")

    def __post_init__(self):
        check_choice("dtype", self.dtype, DTYPES)
        check_bool("onload", self.onload)
        check_bool("cache", self.cache)
        self.park_in_memory = check_number("park_in_memory", self.park_in_memory, 0,
                                           low_open=False)
        resolve_device(self.device)
        if self.scratch is not None and not os.path.isdir(self.scratch):
            raise RankwiseError(f"scratch folder {self.scratch} does not exist")


@contextlib.contextmanager
def _sampling_place(net, sources: list[Source], placement: Placement, seqlen: int,
                    chosen: bool) -> Iterator[list[Source]]:
    """The sources to draw while the model samples its own windows on the device the
    compression runs on: an onloaded model is made resident for the sampling when it fits
    there with its KV cache. Where it does not, decoding on the CPU would dominate the
    run (a 7B reads 14-28 GB of weights per token), so the default mixture drops `self`
    with a warning; a mixture the user chose keeps it, warned."""
    if not any(s.is_self for s in sources):
        yield sources
        return
    with placement.resident(net, sampling_bytes(net, seqlen)) as resident:
        if not resident:
            if chosen:
                log.warning("the model does not fit on %s to sample its own calibration "
                            "windows; sampling them on the CPU, which is slow for a large "
                            "model", placement.device)
            else:
                log.warning("the model does not fit on %s to sample its own calibration "
                            "windows and sampling on the CPU would dominate the run; "
                            "calibrating on the texts alone (choose --calib with self to "
                            "sample anyway)", placement.device)
                sources = without_self(sources)
        yield sources


@dataclass
class CompressOutcome:
    folder: Path
    summary: Summary
    manifest: Manifest


def compress_model(run: CompressRun, config: CompressConfig | None = None,
                   calibration: CalibrationConfig | None = None,
                   progress: bool = True, storage: StorageConfig | None = None) -> CompressOutcome:
    """Compress the model run.model (None: the embedded default; a rankwise output is cut
    or rounded further) with `config`, calibrated on `calibration`, and write it to run.out
    (atomically) with rankwise.json and ranks.png, its floats stored as `storage` says.
    Everything cheap to check is checked first."""
    config = config or CompressConfig()
    calibration = calibration or CalibrationConfig()
    storage = storage or StorageConfig()
    model = run.model
    out = Output(run.out, "compress", inputs=[model_path(model)])
    stored_dtype = storage_dtype(model, storage.save_dtype)
    if config.rounds:
        # pricing and rounding free many tensors of a few MB between long-lived ones: with
        # the threshold fixed, resident memory stays flat (1.94 GB against 2.38 for --bits
        # 3.5 on the 135M) for about a fifth more time, so only where a run rounds
        fix_mmap_threshold()
    device = resolve_device(run.device)
    sources = parse_sources(calibration.calib)
    cache = Cache(enabled=run.cache)
    net, tokenizer, source, _ = open_model(model, dtype=run.dtype, cache=cache)
    base_model_type(net.config)          # written into the output: checked before the work
    check_compressible(net)
    if not run.onload:
        net.to(device)
    chosen = calibration.calib != list(DEFAULT_CALIBRATION)
    if not chosen:                                          # not chosen: fall back, not fail
        sources = without_self_if_unsampleable(sources, net, tokenizer)
    placement = Placement.of(net, device if run.onload else None)
    with _sampling_place(net, sources, placement, calibration.seqlen, chosen) as sources:
        windows, drawn = mixture_windows(
            sources, tokenizer, net, calibration.draw(), progress, cache=cache,
            model_key=cache.digest(model_path(model)) if run.cache else None)
    summary = compress_(net, config, windows, progress=progress, scale_dtype=stored_dtype,
                        execution=Execution(calibration.batch_size, calibration.seed,
                                            placement, run.scratch,
                                            int(run.park_in_memory * 2 ** 30)))
    net.cpu()
    manifest = Manifest(
        source_model=source, config=config.to_dict(), **summary.recorded(config),
        calibration={"sources": drawn, "windows": calibration.calib_samples,
                     "seqlen": calibration.seqlen, "seed": calibration.seed,
                     "batch_size": calibration.batch_size, "tokens": summary.calibration_tokens},
        run={"device": device, "dtype": run.dtype, "onload": run.onload,
             "spilled_bytes": summary.spilled_bytes, "cache": cache.record},
        serving=serving_reports(net, stored_dtype))
    if distributed.is_leader():      # under torchrun every rank holds the result; one writes
        with out.writing() as tmp:
            manifest = write_model(tmp, net, manifest, tokenizer, stored_dtype)
            rank_chart(summary.ranks, summary.shapes, tmp / "ranks.png",
                       f"{config.metric}, {config.allocation}, {config.budget.title(summary)}")
    distributed.barrier()
    return CompressOutcome(out.path, summary, manifest)
