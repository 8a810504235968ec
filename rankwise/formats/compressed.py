"""Rounded weights stored as the ecosystem stores quantized weights: the compressed-tensors
format. Each module on a grid `X` (a factor, a rounded weight, the rounded base of a
composite layer) is written as `X.weight_packed` (its integers packed densely into int32),
`X.weight_scale` (per group of 32, 64 or 128 inputs, or per row as the "channel" strategy,
in the folder's float dtype) and `X.weight_shape`, and config.json gains the
`quantization_config` that names every such module. Plain transformers loads the folder
through its compressed-tensors integration; vLLM through its compressed-tensors schemes
(rankwise's plugin: rankwise.serving); rankwise itself reads and writes it here.

The packing is written and read here rather than by the compressed-tensors package: the
layout of 8-, 4- and 2-bit words is the same in every release, but 3-bit weights were
packed ten to a word with two bits left over up to 0.17 and densely (across words) from
0.18, the layout vLLM sizes its tensors for. rankwise writes the dense layout whatever is
installed (so a folder is the same bytes beside any vLLM) and reads it itself; the
standalone modeling file refuses a 3-bit folder under compressed-tensors older than 0.18,
which would misread it.

Why compressed-tensors and not torchao's serialization: torchao saves tensor subclasses
whose pickled layout depends on the torchao version and loads only with torchao's own
classes, and vLLM does not read it; compressed-tensors is plain safetensors with a
declared scheme, read by transformers and vLLM alike.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import RankwiseError
from ..forms.grids import Grid
from ..forms.rounding import is_quantized, mark

FORMAT = "pack-quantized"
DENSE_PACKING_SINCE = "0.18"      # compressed-tensors' first release packing 3 bits densely


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers q (rows x columns, within `bits`) packed densely along each row into
    int32 words, value j at bits j*bits .. of the row's bit string, offset to unsigned
    (compressed-tensors' pack-quantized layout)."""
    rows, columns = q.shape
    words = math.ceil(columns * bits / 32)
    u = (q.to(torch.int64) + (1 << (bits - 1))).reshape(rows, columns)
    start = torch.arange(columns, dtype=torch.int64) * bits
    packed = torch.zeros(rows, words + 1, dtype=torch.int64)
    word, offset = start // 32, start % 32
    packed.scatter_add_(1, word.expand(rows, -1), (u << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32                        # values split across two words
    if spill.any():
        packed.scatter_add_(1, (word[spill] + 1).expand(rows, -1), u[:, spill] >> (32 - offset[spill]))
    packed = packed[:, :words]
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The signed integers (int8, rows x columns) `pack` packed."""
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64)], dim=1)
    start = torch.arange(columns, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    value = (words[:, word] >> offset) | (words[:, word + 1] << (32 - offset))
    return ((value & ((1 << bits) - 1)) - (1 << (bits - 1))).to(torch.int8)


def quantized_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


def compressed_state(modules: dict[str, nn.Linear], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of each quantized module (its weight replaced by the packed
    integers, the scale and the shape), the bias in `dtype`."""
    out = {}
    for name, m in modules.items():
        grid, scale = m.rankwise_grid, m.rankwise_scale.float()
        weight = m.weight.detach().float()           # exactly q * scale in float32
        rows, columns = weight.shape
        group = grid.group_for(columns)
        q = torch.round(weight.reshape(rows, -1, group) / scale[:, :, None]).reshape(rows, columns)
        out[f"{name}.weight_packed"] = pack(q, grid.bits)
        out[f"{name}.weight_scale"] = scale.to(dtype).contiguous()
        out[f"{name}.weight_shape"] = torch.tensor([rows, columns], dtype=torch.int64)
        if m.bias is not None:
            out[f"{name}.bias"] = m.bias.detach().to(dtype).contiguous()
    return out


def scheme(grid: Grid, targets: list[str]) -> dict:
    """One compressed-tensors scheme: symmetric integers on `grid` for these modules."""
    return {"targets": targets,
            "weights": {"num_bits": grid.bits, "type": "int", "symmetric": True,
                        "group_size": grid.group_size,
                        "strategy": "channel" if grid.group_size is None else "group",
                        "dynamic": False},
            "input_activations": None, "output_activations": None, "format": None}


def quantization_config(modules: dict[str, nn.Linear]) -> dict:
    """config.json's quantization_config: one scheme per distinct grid, naming its modules."""
    by_grid: dict[Grid, list[str]] = {}
    for name, m in modules.items():
        by_grid.setdefault(m.rankwise_grid, []).append(name)
    return {"config_groups": {f"group_{i}": scheme(grid, names)
                              for i, (grid, names) in enumerate(by_grid.items())},
            "quant_method": "compressed-tensors", "format": FORMAT,
            "quantization_status": "compressed", "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None, "version": DENSE_PACKING_SINCE}


def grids_of(config: dict) -> dict[str, Grid]:
    """{module name: grid} a quantization_config declares, checked to be what rankwise
    writes (symmetric integers of 2 to 8 bits, per row or in groups, pack-quantized)."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RankwiseError(f"quantized weights in format {config.get('format')!r}; rankwise "
                            f"reads {FORMAT!r}")
    out = {}
    for group in config.get("config_groups", {}).values():
        w = group.get("weights") or {}
        if w.get("type") != "int" or not w.get("symmetric") or \
                w.get("strategy") not in ("channel", "group"):
            raise RankwiseError(f"a quantization scheme rankwise does not write: {w}")
        grid = Grid(w.get("num_bits"), w.get("group_size") if w["strategy"] == "group" else None)
        out.update(dict.fromkeys(group.get("targets", []), grid))
    return out


def read_quantized(model: nn.Module, config: dict, tensors) -> set[str]:
    """Fill the quantized modules named by `config` (config.json's quantization_config) from
    `tensors` (a safetensors handle), each marked with its grid; returns the keys used."""
    used = set()
    for name, grid in grids_of(config).items():
        keys = {k: f"{name}.{k}" for k in ("weight_packed", "weight_scale", "weight_shape")}
        module = model.get_submodule(name)
        rows, columns = (int(v) for v in tensors.get_tensor(keys["weight_shape"]))
        if (rows, columns) != tuple(module.weight.shape):
            raise RuntimeError(f"{name} has shape {(rows, columns)}, the manifest says "
                               f"{tuple(module.weight.shape)}")
        scale = tensors.get_tensor(keys["weight_scale"]).float()   # q * scale exact in float32
        q = unpack(tensors.get_tensor(keys["weight_packed"]), grid.bits, columns)
        group = grid.fitted(columns).group_for(columns)
        if scale.shape != (rows, columns // group):
            raise RuntimeError(f"{name}'s scales have shape {tuple(scale.shape)}, its grid "
                               f"{grid} needs {(rows, columns // group)}")
        weight = (q.float().reshape(rows, -1, group) * scale[:, :, None]).reshape(rows, columns)
        with torch.no_grad():
            module.weight.copy_(weight)
        mark(module, grid.fitted(columns), scale)
        used.update(keys.values())
    return used
