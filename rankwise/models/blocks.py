"""What a model is made of, found generically: its repeated blocks, the linear maps inside
them that a compression targets, which of those read the very same input (q/k/v, gate/up),
and a check that its weights are finite."""
from __future__ import annotations

import logging
import re
from typing import Callable

import torch
from torch import nn

from ..errors import RankwiseError
from .layers import CompositeLinear, factorable_modules, held_by

log = logging.getLogger(__name__)


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
    """A part of a composite layer (A, B, base), of a layer already listed."""
    owner = name.rpartition(".")[0]
    return isinstance(factorable.get(owner), CompositeLinear)


def _holds_a_matrix(module: nn.Module) -> bool:
    """A leaf that multiplies by a parameter matrix: what a user would expect factored."""
    if next(module.children(), None) is not None or isinstance(module, nn.Embedding):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2



def shared_inputs(module: nn.Module, layers: dict[str, nn.Module], call) -> dict[str, str]:
    """{layer: the first layer reading the very same input tensor} from one forward call
    (`call()` runs `module` once); a layer alone in its group leads itself."""
    leader, last = {}, [None, None]

    def hook(name):
        def pre(mod, args):
            same = last[0] is not None and last[0] is args[0]
            leader[name] = last[1] if same else name
            last[0], last[1] = args[0], leader[name]
        return pre
    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            call()
    finally:
        for h in handles:
            h.remove()
    return leader
