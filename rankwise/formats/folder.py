"""Save and load compressed models: model.safetensors + HF config.json + rankwise.json (the
manifest: rankwise.formats.manifest).

`load` rebuilds the compressed architecture from the manifest's structure (each composite
layer's form and rank), so no compression is re-run and the logits are identical to the
saved model's.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import RankwiseError
from ..forms import packed, registry
from ..forms.rounding import is_quantized
from ..models.blocks import check_finite
from ..models.fusion import fuse_siblings
from ..models.layers import fused_groups, set_module
from ..version import __version__
from . import compressed as ct_format
from . import manifest as manifests
from .atomic import Output
from .hf import MODELING_FILE, base_config, hf_config, modeling_source
from .loading import DEFAULT_MODEL_NAME, load_model, model_path
from .manifest import Manifest, StorageRecord

MANIFEST = manifests.NAME
EVAL_FILE = "eval.json"        # rankwise eval's results, which rankwise report reads
WEIGHTS = "model.safetensors"


def _versions() -> dict[str, str]:
    import transformers
    return {"rankwise": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def save(model: nn.Module, folder: str | os.PathLike, manifest: Manifest | None = None,
         tokenizer=None, writer: str = "save", storage: torch.dtype | None = None) -> Path:
    """Write the model as a rankwise output folder, atomically (rankwise.formats.atomic): an
    existing folder is replaced only when `writer` wrote it. `storage`: see write_model."""
    out = Output(folder, writer)
    with out.writing() as tmp:
        write_model(tmp, model, manifest, tokenizer, storage)
    return out.path


def write_model(folder: Path, model: nn.Module, manifest: Manifest | None = None,
                tokenizer=None, storage: torch.dtype | None = None) -> Manifest:
    """The files of a rankwise output, into an existing (temporary) folder. Floating-point
    weights are stored in `storage` (None: float32) and the model in memory is rounded to
    them first, so what was saved is what the caller holds; factors on an integer grid
    (rankwise.forms.rounding) are stored in the compressed-tensors format (rankwise.formats.compressed).
    The manifest records the dtype, the file's bytes and the bits per original parameter
    of the targeted layers; returns it as written."""
    from safetensors.torch import save_file

    storage = storage or torch.float32
    record = dataclasses.replace(manifest or Manifest(), structure=registry.structure(model),
                                 versions=_versions())
    round_to(model, storage)
    quantized = ct_format.quantized_modules(model)
    tensors = _stored_tensors(model, storage, quantized)
    config = hf_config(model, record.structure, fused_groups(model))
    config["dtype"] = str(storage).removeprefix("torch.")
    if quantized:
        config["quantization_config"] = ct_format.quantization_config(quantized)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / MODELING_FILE).write_text(modeling_source(config["rankwise_base_model_type"]))
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    record.storage = storage_record(tensors, record, storage, quantized)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    manifests.write(folder, record)
    return record


def round_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating-point parameter and persistent buffer rounded to `dtype`, kept in its
    own (non-persistent buffers such as rotary frequencies are rebuilt on load, not stored,
    and weights on an integer grid are stored as integers and scales: both left as they
    are). In place, so tensors that are views of another (fused siblings) follow."""
    with torch.no_grad():
        for module in model.modules():
            exact = {"weight"} if is_quantized(module) else set()
            stored = [*module.named_parameters(recurse=False),
                      *((n, b) for n, b in module.named_buffers(recurse=False)
                        if n not in module._non_persistent_buffers_set)]
            for name, t in stored:
                if name not in exact and t.is_floating_point() and t.dtype != dtype:
                    t.copy_(t.to(dtype))


def _stored_tensors(model: nn.Module, storage: torch.dtype,
                    quantized: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state dict as written: tied tensors once (under the name that is not tied),
    floats in `storage`, quantized modules in their compressed form."""
    state = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    kept: dict[tuple, str] = {}
    for key in sorted(state, key=lambda k: k in tied):      # untied names first
        kept.setdefault((state[key].data_ptr(), state[key].shape, state[key].dtype), key)
    owned = {f"{name}.{leaf}" for name in quantized for leaf in ("weight", "bias")}
    tensors = {key: state[key].to(storage) if state[key].is_floating_point() else state[key]
               for key in kept.values() if key not in owned}
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    tensors.update(ct_format.compressed_state(quantized, storage) if quantized else {})
    return tensors


def storage_record(tensors: dict[str, torch.Tensor], record: Manifest, storage: torch.dtype,
                   quantized: dict[str, nn.Module]) -> StorageRecord:
    """What the weights file holds: its dtype, the grids it uses, its bytes, and the bits
    per original weight parameter of the targeted layers (every byte stored for them,
    whatever their form, biases included, over their dense weight's parameter count)."""
    layers = set(record.forms or record.structure)
    targeted = sum(t.numel() * t.element_size() for key, t in tensors.items()
                   if _owner(key, layers))
    dense = record.targeted_params.get("dense")
    return StorageRecord(dtype=str(storage).removeprefix("torch."),
                         grids=sorted({str(m.rankwise_grid) for m in quantized.values()}),
                         tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                         targeted_bytes=targeted,
                         bits_per_targeted_param=8 * targeted / dense if dense else None)


def _owner(key: str, layers: set[str]) -> bool:
    """Whether a tensor's key belongs to one of `layers` (its own tensors or its parts')."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))


def dense_source(manifest: Manifest) -> str | None:
    """The model a rankwise output was compressed from, as a model spec (None: the
    embedded default): the dense reference of its evaluation and the teacher of healing."""
    origin = manifest.source_model
    return None if origin == DEFAULT_MODEL_NAME else origin


def is_output(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def open_model(spec: str | os.PathLike | None = None, need_tokenizer: bool = True,
               dtype: str = "float32", cache=None):
    """(model, tokenizer, source, manifest) from a rankwise output folder (manifest: its
    rankwise.json; tokenizer None when the folder has none and none is needed) or anything
    models.load_model takes (manifest None); weights in `dtype`, on the CPU."""
    if not is_output(spec):
        return (*load_model(spec, dtype, cache), None)
    from transformers import AutoTokenizer
    folder = model_path(spec)
    model, manifest = load(folder, getattr(torch, dtype)), read_manifest(folder)
    tokenizer = None
    if (folder / "tokenizer_config.json").exists():
        try:     # the base config, so that loading a tokenizer never runs the folder's code
            tokenizer = AutoTokenizer.from_pretrained(folder, config=base_config(folder))
        except (OSError, ValueError) as e:
            raise RankwiseError(f"no usable tokenizer in {folder}") from e
    elif need_tokenizer:
        raise RankwiseError(f"{folder} holds no tokenizer, which this needs; it was saved "
                            "without one")
    return model, tokenizer, str(folder), manifest


def read_manifest(folder: str | os.PathLike) -> Manifest:
    return manifests.read(folder)


def load(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a saved compressed model (a transformers model with its composite layers) in
    `dtype`; in a 16-bit dtype its rounded layers that a kernel here runs stay packed
    (rankwise.forms.packed: memory about the bytes on disk), the rest are floats."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    record = read_manifest(folder)
    model = AutoModelForCausalLM.from_config(base_config(folder), dtype=torch.float32)
    try:
        for name, layer in record.structure.items():
            set_module(model, name, registry.skeleton(model.get_submodule(name), layer))
    except (AttributeError, ValueError, TypeError, RankwiseError) as e:
        raise RankwiseError(f"{folder / MANIFEST} does not match the model in config.json: {e}") from None
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config")
    try:
        missing, unexpected = _read_weights(model, folder / WEIGHTS, quantization)
    except FileNotFoundError:
        raise RankwiseError(f"{folder / WEIGHTS} is missing") from None
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RankwiseError(f"{folder / WEIGHTS} is corrupted or does not match the manifest: "
                            f"{str(e).splitlines()[0]}") from None
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise RankwiseError(f"{folder / WEIGHTS} does not match the manifest: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    check_finite(model, str(folder / WEIGHTS))
    if dtype != torch.float32:       # packed from the grid's exact float32 values
        packed.pack(model, dtype, set_module)
        model.to(dtype)
    fuse_siblings(model, json.loads((folder / "config.json").read_text()).get("rankwise_siblings", []))
    return model.eval()


def _read_weights(model: nn.Module, path: Path, quantization: dict | None = None
                  ) -> tuple[list[str], list[str]]:
    """Copy a safetensors file into the model's tensors one at a time (never a second copy
    of the whole model in memory), the modules `quantization` (config.json's
    quantization_config) names through rankwise.formats.compressed; returns (missing, unexpected)
    keys."""
    from safetensors import safe_open
    if not path.is_file():
        raise FileNotFoundError(path)
    state = model.state_dict()
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        used = ct_format.read_quantized(model, quantization, f) if quantization else set()
        filled_weights = {key.rsplit(".", 1)[0] + ".weight" for key in used}
        keys = {_current_key(key, state): key for key in f.keys() if key not in used}
        keys.update({key: key for key in filled_weights})
        for key in keys.keys() & state.keys() - filled_weights:
            value = f.get_tensor(keys[key])
            if value.shape != state[key].shape:
                raise RuntimeError(f"{key} has shape {tuple(value.shape)}, the manifest says "
                                   f"{tuple(state[key].shape)}")
            state[key].copy_(value)
    filled = {state[k].data_ptr() for k in keys.keys() & state.keys()}   # tied tensors count once
    missing = [k for k in state.keys() - keys.keys() if state[k].data_ptr() not in filled]
    return sorted(missing), sorted(keys.keys() - state.keys())


def _current_key(key: str, state: dict) -> str:
    """A factored layer's key as this release names it: folders written before the factors
    were nn.Linear modules hold `X.A`, `X.B` and `X.bias` for `X.A.weight`, `X.B.weight`
    and `X.B.bias`."""
    if key in state:
        return key
    owner, _, leaf = key.rpartition(".")
    renamed = {"A": f"{owner}.A.weight", "B": f"{owner}.B.weight", "bias": f"{owner}.B.bias"}
    return renamed[leaf] if renamed.get(leaf) in state else key


def _is_tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
