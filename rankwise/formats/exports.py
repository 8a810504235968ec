"""Exports: a rankwise output written in another format, for runtimes that do not load the
output folder itself (which plain transformers already loads with trust_remote_code).

The registry holds each format's writer, `(model, tokenizer, manifest, folder) -> None`,
which fills an empty temporary folder; `export` checks the target (never the source), loads the
output, and writes through rankwise.formats.atomic (atomic, replaced only whole and only when an
earlier export wrote it). A new format is one function and one registry entry.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import RankwiseError
from ..forms.registry import form_of
from ..models.layers import CompositeLinear, set_module
from .folder import write_model
from .manifest import Manifest


def write_dense(model: nn.Module, tokenizer, manifest: Manifest, folder: Path) -> None:
    """A plain transformers checkpoint of the base architecture, every composite layer
    merged back into a dense weight (no remote code)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, CompositeLinear):
            set_module(model, name, module.merge())
    if hasattr(model.config, "quantization_config"):    # rounded weights are written as floats
        del model.config.quantization_config
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_lora(model: nn.Module, tokenizer, manifest: Manifest, folder: Path) -> None:
    """The model without its adapters in `base/` (a rankwise output: the rounded weights in
    compressed-tensors, any low-rank layers as factors) and every layer whose form is a
    base plus a low-rank adapter (a rounded weight's correction) as a PEFT LoRA adapter
    over it in `adapter/`, the way a quantized base serves LoRA (vLLM) and GPTQModel ships
    EoRA. Each layer's alpha is its rank, so PEFT's scale alpha / r is 1 and base + adapter
    computes what the output computes."""
    from safetensors.torch import save_file
    adapters = {name: parts for name, m in model.named_modules()
                if isinstance(m, CompositeLinear)
                for parts in [form_of(m).of.adapter(m)] if parts is not None}
    if not adapters:
        raise RankwiseError("this output has no rounded layer with a low-rank correction; "
                            "the lora format writes those corrections as an adapter")
    storage = getattr(torch, manifest.storage.dtype if manifest.storage else "float32")
    tensors, ranks = {}, {}
    for name, (base, A, B) in adapters.items():
        set_module(model, name, base)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = A.detach().to(storage).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = B.detach().to(storage).contiguous()
        ranks[name] = A.shape[0]
    # the base keeps its source and its own bytes: the bits of the rounded layers alone
    base = Manifest(source_model=manifest.source_model, targeted_params=manifest.targeted_params,
                    forms={name: form_of(model.get_submodule(name)).record()
                           for name in manifest.forms or manifest.structure},
                    export="the base of a lora export")
    (folder / "base").mkdir()
    write_model(folder / "base", model, base, tokenizer, storage)
    (folder / "adapter").mkdir()
    save_file(tensors, str(folder / "adapter" / "adapter_model.safetensors"),
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
    write: Callable[[nn.Module, object, Manifest, Path], None]
    help: str


FORMATS = {f.name: f for f in (
    Format("dense", write_dense, "a plain transformers checkpoint, factors merged back"),
    Format("lora", write_lora, "the rounded model in base/ and its low-rank corrections as "
                               "a PEFT LoRA adapter in adapter/"),
)}




