"""A rankwise output in vLLM, built on vLLM's own implementation of its base family (Llama,
Qwen2, Gemma, Phi-3, OPT, ...): the family's model as vLLM builds it, with the layers the
output changed put in place before its weights are read.

  a layer on a grid      stays in vLLM's own (possibly fused) linear layer with vLLM's
                         compressed-tensors scheme and kernel when the engine runs its grid
                         (rankwise.serving.engines); a 2- or 3-bit grid is repacked to 4
                         bits as it is read (exact: the 4-bit grid holds it); a grid the
                         engine cannot run is dequantized to the model's floats as it is read;
  low rank               two vLLM linear layers, A then B;
  rounded + correction   its rounded base as a vLLM linear layer of the original's kind plus
                         the correction's two, added inside the layer (not an adapter);
  a fused layer          (q/k/v, gate/up) whose members differ in form or grid: one layer
                         per member, their outputs concatenated in the fused layer's order.

Tensor parallelism: a factored layer in place of a column-parallel one (q/k/v, gate/up)
keeps A whole on every rank (in -> rank, small) and shards B's outputs as the original
was sharded (B is a layer of the original's own kind with `rank` inputs, so fused outputs
split by member as before); in place of a row-parallel one (o, down) A is row-parallel
(each rank its slice of the inputs, the rank-wide result all-reduced) and B is whole on
every rank. A member of a fused layer on its own is a column-parallel layer of the
member's width, which shards like the fused layer while heads divide by the ranks (the
plugin refuses key/value heads fewer than the ranks there, which vLLM replicates).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.layers.linear import (ColumnParallelLinear, LinearBase,
                                               LinearMethodBase, MergedColumnParallelLinear,
                                               QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear, UnquantizedLinearMethod)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import \
    CompressedTensorsConfig
from vllm.model_executor.models.registry import ModelRegistry
from vllm.platforms import current_platform

from ..errors import RankwiseError
from ..formats import compressed
from ..forms.grids import Grid
from .engines import DEQUANTIZED, ENGINES, PACKED, REPACKED

FORMS = ("lowrank", "corrected")          # the composite forms this file builds


def engine():
    return ENGINES["vllm-cpu" if current_platform.is_cpu() else "vllm-cuda"]


class Plan:
    """What each linear layer of an output is and how this engine serves it: the composite
    layers (config.json's rankwise_layers) and every matrix on a grid, its shape read from
    the weights file and its grid as the engine serves it (None: floats)."""

    def __init__(self, config, folder: Path, dtype: torch.dtype):
        from safetensors import safe_open
        self.structure = dict(getattr(config, "rankwise_layers", None) or {})
        declared = getattr(config, "quantization_config", None) or {}
        declared = declared if isinstance(declared, dict) else declared.to_dict()
        grids = compressed.grids_of(declared) if declared.get("config_groups") else {}
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            shapes = {name: tuple(int(v) for v in f.get_tensor(f"{name}.weight_shape"))
                      for name in grids}
        self.engine, self.dtype = engine(), dtype
        self.ways = {n: self.engine.serves(grids[n], shapes[n]) for n in grids}
        self.grids = grids
        self.served = {n: (g if self.ways[n] == PACKED else Grid(4, g.group_size))
                       for n, g in grids.items() if self.ways[n] != DEQUANTIZED}

    def key(self, name: str):
        """What a matrix is as served: a composite form, its served grid, or floats."""
        if name in self.structure:
            return ("composite", name)
        return self.served.get(name)

    def quant_config(self) -> CompressedTensorsConfig | None:
        """vLLM's compressed-tensors config of the grids as served."""
        by_grid: dict[Grid, list[str]] = {}
        for name, grid in self.served.items():
            by_grid.setdefault(grid, []).append(name)
        if not by_grid:
            return None
        groups = {f"group_{i}": compressed.scheme(grid, names)
                  for i, (grid, names) in enumerate(by_grid.items())}
        return CompressedTensorsConfig.from_config(
            {"config_groups": groups, "format": compressed.FORMAT, "ignore": [],
             "quant_method": "compressed-tensors", "quantization_status": "compressed"})

    def transformed(self, weights):
        """The checkpoint's tensors as the engine reads them: a repacked matrix's integers
        at 4 bits, a dequantized matrix's weight in floats."""
        waiting: dict[str, dict] = {}
        for name, tensor in weights:
            owner, _, leaf = name.rpartition(".")
            way = self.ways.get(owner)
            if way in (None, PACKED) or leaf not in ("weight_packed", "weight_scale",
                                                      "weight_shape"):
                yield name, tensor
                continue
            parts = waiting.setdefault(owner, {})
            parts[leaf] = tensor
            if len(parts) < 3:
                continue
            del waiting[owner]
            rows, columns = (int(v) for v in parts["weight_shape"])
            q = compressed.unpack(parts["weight_packed"], self.grids[owner].bits, columns)
            if way == REPACKED:
                yield f"{owner}.weight_packed", compressed.pack(q, 4)
                yield f"{owner}.weight_scale", parts["weight_scale"]
                yield f"{owner}.weight_shape", parts["weight_shape"]
            else:
                scale = parts["weight_scale"].float()
                group = columns // scale.shape[1]
                weight = q.float().reshape(rows, -1, group) * scale[:, :, None]
                yield f"{owner}.weight", weight.reshape(rows, columns).to(self.dtype)
        if waiting:
            raise RankwiseError(f"the weights file lacks part of {next(iter(waiting))}'s "
                                "packed weight (weight_packed, weight_scale, weight_shape)")


class _Deferred(LinearMethodBase):
    """A fused or composite layer's placeholder while vLLM builds the family's model: it
    holds no weights and is replaced before any are read."""

    def create_weights(self, layer, *args, **kwargs):
        pass

    def apply(self, layer, x, bias=None):
        raise RuntimeError(f"{layer.prefix} was not replaced by its rankwise layer")


class _Config(QuantizationConfig):
    """What vLLM asks of every quantization config, for the two below."""

    def get_name(self):
        return "rankwise"

    def get_supported_act_dtypes(self):
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls):
        return -1

    @staticmethod
    def get_config_filenames():
        return []

    @classmethod
    def from_config(cls, config):
        raise NotImplementedError


class _Template(_Config):
    """A layer built only for its geometry: no weights."""

    def get_quant_method(self, layer, prefix):
        return _Deferred() if isinstance(layer, LinearBase) else None


class _Routing(_Config):
    """The family's layers as vLLM builds them: a layer whose members the output changed is
    deferred (replaced afterwards), every other one quantized as served."""

    def __init__(self, plan: Plan, packed: dict[str, list[str]]):
        super().__init__()
        self.plan, self.packed = plan, packed
        self.served = plan.quant_config()
        if self.served is not None:     # what it resolves a fused layer's members by
            self.served.packed_modules_mapping = packed
        self.deferred: dict[str, list[str]] = {}

    def members(self, prefix: str) -> list[str]:
        owner, _, leaf = prefix.rpartition(".")
        return [f"{owner}.{m}" if owner else m for m in self.packed.get(leaf, [leaf])]

    def get_quant_method(self, layer, prefix):
        if isinstance(layer, LinearBase):
            members = self.members(prefix)
            if len({str(self.plan.key(m)) for m in members}) > 1 or \
                    any(m in self.plan.structure for m in members):
                self.deferred[prefix] = members
                return _Deferred()
        if self.served is None:
            return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None
        return self.served.get_quant_method(layer, prefix)


def _like(parent: LinearBase, input_size: int, bias: bool, quant, prefix: str) -> LinearBase:
    """A layer of `parent`'s kind and output geometry with `input_size` inputs."""
    common = dict(bias=bias, quant_config=quant, prefix=prefix)
    if isinstance(parent, QKVParallelLinear):
        return QKVParallelLinear(input_size, parent.head_size, parent.total_num_heads,
                                 parent.total_num_kv_heads, v_head_size=parent.v_head_size,
                                 **common)
    if isinstance(parent, MergedColumnParallelLinear):
        return MergedColumnParallelLinear(input_size, parent.output_sizes,
                                          gather_output=parent.gather_output, **common)
    if isinstance(parent, ColumnParallelLinear):
        return ColumnParallelLinear(input_size, parent.output_size,
                                    gather_output=parent.gather_output, **common)
    if isinstance(parent, RowParallelLinear):
        return RowParallelLinear(input_size, parent.output_size,
                                 input_is_parallel=parent.input_is_parallel,
                                 reduce_results=parent.reduce_results, **common)
    return ReplicatedLinear(input_size, parent.output_size, **common)


class _Composite(nn.Module):
    """A composite layer (module docstring) in place of `parent` (a vLLM linear layer):
    low rank, B(A(x)); corrected, base(x) + B(A(x)). Returns (output, None) as vLLM's
    linear layers do."""

    def __init__(self, parent: LinearBase, name: str, form: str, rank: int, bias: bool, quant):
        super().__init__()
        self.form = form
        row = isinstance(parent, RowParallelLinear)
        if row and parent.tp_size > 1 and not parent.reduce_results:
            raise RankwiseError(f"{name}: a factored row-parallel layer must reduce its "
                                "results under tensor parallelism")
        if form == "corrected":
            self.base = _like(parent, parent.input_size, bias, quant, f"{name}.base")
        if row:
            self.A = RowParallelLinear(parent.input_size, rank, bias=False,
                                       input_is_parallel=parent.input_is_parallel,
                                       quant_config=quant, prefix=f"{name}.A")
            self.B = ReplicatedLinear(rank, parent.output_size, bias=bias and form == "lowrank",
                                      quant_config=quant, prefix=f"{name}.B")
        else:
            self.A = ReplicatedLinear(parent.input_size, rank, bias=False, quant_config=quant,
                                      prefix=f"{name}.A")
            self.B = _like(parent, rank, bias and form == "lowrank", quant, f"{name}.B")

    def forward(self, x):
        h, _ = self.A(x)
        y, _ = self.B(h)
        if self.form == "corrected":
            y = self.base(x)[0] + y
        return y, None


class _Split(nn.Module):
    """A fused layer whose members differ, one layer per member (named as the member),
    outputs concatenated in the fused order."""

    def __init__(self, parent: LinearBase, members: list[str], plan: Plan, quant):
        super().__init__()
        if isinstance(parent, QKVParallelLinear) and getattr(parent, "num_kv_head_replicas", 1) > 1:
            raise RankwiseError(f"{parent.prefix}: fewer key/value heads than tensor-parallel "
                                "ranks; serve this output on fewer ranks")
        sizes = parent.output_sizes
        self.names = [m.rpartition(".")[2] for m in members]
        for member, leaf, size in zip(members, self.names, sizes):
            layer = plan.structure.get(member)
            column = ColumnParallelLinear(
                parent.input_size, size, bias=parent.has_bias, prefix=member,
                quant_config=quant if layer is None else _Template())
            self.add_module(leaf, column if layer is None else _Composite(
                column, member, layer["form"], layer["rank"], parent.has_bias, quant))

    def forward(self, x):
        return torch.cat([getattr(self, leaf)(x)[0] for leaf in self.names], dim=-1), None


class RankwiseForCausalLM(nn.Module):
    """vLLM's architecture for rankwise outputs: building it builds the base family's own
    vLLM model with the output's layers in place (module docstring). The methods below
    are what vLLM inspects before it builds a model; the instance it gets is the family's,
    which has them all."""

    def __new__(cls, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        family = _family(_base_class(config))
        return family(vllm_config=vllm_config, prefix=prefix)

    def __init__(self, *, vllm_config, prefix: str = ""):
        raise TypeError("built by __new__ as its family's model")

    def embed_input_ids(self, input_ids):
        raise NotImplementedError

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        raise NotImplementedError

    def compute_logits(self, hidden_states):
        raise NotImplementedError


def _base_class(config) -> type[nn.Module]:
    """vLLM's own model of the output's family (vllm_plugin.check_servable has checked it)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return ModelRegistry._try_load_model_cls(
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.rankwise_base_model_type])


@functools.cache
def _family(base: type[nn.Module]) -> type[nn.Module]:
    """The rankwise model class over vLLM's `base` (made once per family)."""
    return type(f"Rankwise{base.__name__}", (_RankwiseModel, base), {})


class _RankwiseModel:
    """Mixed in before a family's vLLM model class (module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        model_config = vllm_config.model_config
        plan = Plan(model_config.hf_config, Path(model_config.model), model_config.dtype)
        routing = _Routing(plan, getattr(type(self), "packed_modules_mapping", {}))
        saved, vllm_config.quant_config = vllm_config.quant_config, routing
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            vllm_config.quant_config = saved
        self._rankwise_plan = plan
        self._rankwise_paths: dict[str, str] = {}      # HF module name -> its module here
        self._swap(routing)

    def _swap(self, routing: _Routing) -> None:
        plan = self._rankwise_plan
        for prefix, members in routing.deferred.items():
            parent = self.get_submodule(prefix)
            if len(members) == 1 and members[0] in plan.structure:
                layer = plan.structure[members[0]]
                new = _Composite(parent, members[0], layer["form"], layer["rank"],
                                 parent.has_bias, routing.served)
                self._rankwise_paths[members[0]] = prefix
            else:
                new = _Split(parent, members, plan, routing.served)
                for member, leaf in zip(members, new.names):
                    self._rankwise_paths[member] = f"{prefix}.{leaf}"
            owner, _, child = prefix.rpartition(".")
            setattr(self.get_submodule(owner) if owner else self, child, new)

    def load_weights(self, weights):
        paths, loaded, rest = self._rankwise_paths, set(), []
        for name, tensor in self._rankwise_plan.transformed(weights):
            owner = next((m for m in paths if name.startswith(m + ".")), None)
            if owner is None:
                rest.append((name, tensor))
                continue
            target = paths[owner] + name[len(owner):]
            param = self.get_parameter(target)
            getattr(param, "weight_loader", _copy)(param, tensor)
            loaded.add(target)
        return loaded | set(super().load_weights(iter(rest)) or ())


def _copy(param: torch.Tensor, tensor: torch.Tensor) -> None:
    param.data.copy_(tensor)

