"""Rounded weights and factors stored as the ecosystem stores quantized weights: the
compressed-tensors format. Each module on a grid `X` (a factor, a rounded weight, the base
of a corrected layer) is written as `X.weight_packed` (its integers packed densely into
int32), `X.weight_scale` (per group of 32, 64 or 128 inputs, or per row as the "channel"
strategy, in the folder's 16-bit dtype) and `X.weight_shape`, and config.json gains the
`quantization_config` that names every such module. Plain transformers loads the folder
through its compressed-tensors integration (the package installed, no rankwise);
rankwise.load reads it through the same package. Serving kernels (vLLM's) read 4- and
8-bit weights in these groups; 3- and 2-bit weights are stored the same way but few
kernels run them.

Why compressed-tensors and not torchao's serialization: torchao saves tensor subclasses
whose pickled layout depends on the torchao version and loads only with torchao's own
classes, and vLLM does not read it; compressed-tensors is plain safetensors with a
declared scheme, read by transformers and vLLM alike.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import RankwiseError
from .grids import Grid
from .rounding import is_quantized, mark

FORMAT = "pack-quantized"


def require_package():
    """compressed_tensors, or one sentence saying how to get it."""
    try:
        import compressed_tensors
    except ImportError:
        raise RankwiseError("quantized factors are stored in the compressed-tensors format, "
                            "which needs its package: pip install compressed-tensors") from None
    return compressed_tensors


def _scheme(grid: Grid, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    weights = QuantizationArgs(num_bits=grid.bits, type="int", symmetric=True,
                               strategy="channel" if grid.group_size is None else "group",
                               group_size=grid.group_size)
    return QuantizationScheme(targets=targets, weights=weights)


def _grid(scheme) -> Grid:
    w = scheme.weights
    return Grid(w.num_bits, w.group_size if str(getattr(w.strategy, "value", w.strategy)) == "group"
                else None)


def quantized_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


def compressed_state(modules: dict[str, nn.Linear], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of each quantized module (its weight replaced by the packed
    integers, the scale and the shape), the bias in `dtype`."""
    require_package()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    out = {}
    for name, m in modules.items():
        state = {"weight": m.weight.detach().float(),       # exactly q * scale in float32
                 "weight_scale": m.rankwise_scale.float()}
        packed = PackedQuantizationCompressor.compress(state, _scheme(m.rankwise_grid, [name]))
        packed["weight_scale"] = packed["weight_scale"].to(dtype)
        out.update({f"{name}.{key}": value.contiguous() for key, value in packed.items()})
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to(dtype)
    return out


def quantization_config(modules: dict[str, nn.Linear]) -> dict:
    """config.json's quantization_config: one scheme per distinct grid, naming its modules."""
    compressed_tensors = require_package()
    from compressed_tensors.quantization import QuantizationConfig
    by_grid: dict[Grid, list[str]] = {}
    for name, m in modules.items():
        by_grid.setdefault(m.rankwise_grid, []).append(name)
    groups = {f"group_{i}": _scheme(grid, names) for i, (grid, names) in enumerate(by_grid.items())}
    config = QuantizationConfig(config_groups=groups, format=FORMAT,
                                quantization_status="compressed", ignore=[])
    return {"version": compressed_tensors.__version__, **config.model_dump()}


def read_quantized(model: nn.Module, config: dict, tensors) -> set[str]:
    """Fill the quantized modules named by `config` (config.json's quantization_config) from
    `tensors` (a safetensors handle), each marked with its grid; returns the keys used."""
    require_package()
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    if config.get("format") != FORMAT:
        raise RankwiseError(f"quantized weights in format {config.get('format')!r}; rankwise "
                            f"reads {FORMAT!r}")
    parsed = QuantizationConfig.model_validate(config)
    used = set()
    for scheme in parsed.config_groups.values():
        for name in scheme.targets:
            keys = {k: f"{name}.{k}" for k in ("weight_packed", "weight_scale", "weight_shape")}
            state = {k: tensors.get_tensor(key) for k, key in keys.items()}
            state["weight_scale"] = state["weight_scale"].float()   # q * scale exact in float32
            weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            module = model.get_submodule(name)
            if tuple(weight.shape) != tuple(module.weight.shape):
                raise RuntimeError(f"{name} has shape {tuple(weight.shape)}, the manifest says "
                                   f"{tuple(module.weight.shape)}")
            with torch.no_grad():
                module.weight.copy_(weight)
            mark(module, _grid(scheme), state["weight_scale"])
            used.update(keys.values())
    return used
