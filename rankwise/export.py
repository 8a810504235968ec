"""Exports: a rankwise output written in another format, for runtimes that do not load the
output folder itself (which plain transformers already loads with trust_remote_code).

The registry holds each format's writer, `(model, tokenizer, manifest, folder) -> None`,
which fills an empty temporary folder; `export` checks the target (never the source), loads the
output, and writes through rankwise.outputs (atomic, replaced only whole and only when an
earlier export wrote it). A new format is one function and one registry entry.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import RankwiseError
from .io import is_output, open_model, write_model
from .layers import CorrectedLinear, LowRankLinear, set_module
from .models import model_path
from .options import check_choice, option
from .outputs import Output


def write_dense(model: nn.Module, tokenizer, manifest: dict, folder: Path) -> None:
    """A plain transformers checkpoint of the base architecture, every factor pair merged
    back into a dense weight (no remote code)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LowRankLinear, CorrectedLinear)):
            set_module(model, name, module.merge())
    if hasattr(model.config, "quantization_config"):    # rounded weights are written as floats
        del model.config.quantization_config
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_lora(model: nn.Module, tokenizer, manifest: dict, folder: Path) -> None:
    """The rounded model without its corrections in `base/` (a rankwise output: the rounded
    weights in compressed-tensors, any low-rank layers as factors) and the corrections as a
    PEFT LoRA adapter over it in `adapter/`, the way a quantized base serves LoRA (vLLM)
    and GPTQModel ships EoRA. Each layer's alpha is its rank, so PEFT's scale alpha / r is
    1 and base + adapter computes what the output computes."""
    from safetensors.torch import save_file
    corrected = {name: m for name, m in model.named_modules() if isinstance(m, CorrectedLinear)}
    if not corrected:
        raise RankwiseError("this output has no rounded layer with a low-rank correction; "
                            "the lora format writes those corrections as an adapter")
    storage = getattr(torch, manifest.get("storage", {}).get("dtype", "float32"))
    adapter = {}
    for name, layer in corrected.items():
        set_module(model, name, layer.base)
        prefix = f"base_model.model.{name}"
        adapter[f"{prefix}.lora_A.weight"] = layer.A.weight.detach().to(storage).contiguous()
        adapter[f"{prefix}.lora_B.weight"] = layer.B.weight.detach().to(storage).contiguous()
    ranks = {name: layer.rank for name, layer in corrected.items()}
    kept = {key: manifest[key] for key in ("source", "targeted_params") if key in manifest}
    (folder / "base").mkdir()
    write_model(folder / "base", model, {**kept, "export": "the base of a lora export"},
                tokenizer, storage)
    (folder / "adapter").mkdir()
    save_file(adapter, str(folder / "adapter" / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "../base",
              "target_modules": sorted(ranks), "r": max(ranks.values()),
              "lora_alpha": max(ranks.values()), "rank_pattern": ranks, "alpha_pattern": ranks,
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True}
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2))


@dataclass(frozen=True)
class Format:
    name: str
    write: Callable[[nn.Module, object, dict, Path], None]
    help: str


FORMATS = {f.name: f for f in (
    Format("dense", write_dense, "a plain transformers checkpoint, factors merged back"),
    Format("lora", write_lora, "the rounded model in base/ and its low-rank corrections as "
                               "a PEFT LoRA adapter in adapter/"),
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
    model, tokenizer, _, manifest = open_model(config.model, need_tokenizer=False)
    with out.writing() as tmp:
        FORMATS[config.format].write(model, tokenizer, manifest, tmp)
    return out.path
