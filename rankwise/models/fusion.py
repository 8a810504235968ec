"""Which factored layers read the same input, and installing their fusion
(layers.Siblings) on a model."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .blocks import shared_inputs
from .layers import LowRankLinear, Siblings, fused_groups


def discover_siblings(model: nn.Module, call: Callable[[], object]) -> list[list[str]]:
    """Groups (by name, two or more) of factored layers called one after another on the
    very same tensor during `call()`, one forward of `model`."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    groups: dict[str, list[str]] = {}
    for name, leader in shared_inputs(model, layers, call).items():
        groups.setdefault(leader, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def fuse_siblings(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """Stack the first factors of each group of factored layers (names); a group whose
    layers are not all factored with plain float factors of one dtype and device is left
    unfused. Returns the groups fused (and only those: any fusion installed before is
    undone first)."""
    unfuse_siblings(model)
    fused = []
    for names in groups:
        members = [model.get_submodule(n) for n in names]
        if len(members) > 1 and all(isinstance(m, LowRankLinear) for m in members):
            group = Siblings(members)
            if group.layout:           # stacked: plain float factors of one dtype and device
                fused.append(list(names))
            else:
                for m in members:
                    m._siblings = None
    return fused


def unfuse_siblings(model: nn.Module) -> None:
    """Every factored layer back to its own two matmuls (A given storage of its own)."""
    for m in model.modules():
        if isinstance(m, LowRankLinear) and m._siblings is not None:
            m.A.weight.data = m.A.weight.data.clone()
            m._siblings = None


def fuse_causal_lm(model: nn.Module) -> list[list[str]]:
    """Discover and fuse the sibling groups of a transformers model from one forward of two
    tokens; a model without input embeddings is left as it is."""
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    if embed is None or not any(isinstance(m, LowRankLinear) for m in model.modules()):
        return []
    probe = torch.zeros(1, 2, dtype=torch.long, device=embed.weight.device)
    with torch.no_grad():
        groups = discover_siblings(model, lambda: model(probe))
    return fuse_siblings(model, groups)


__all__ = ["discover_siblings", "fuse_causal_lm", "fuse_siblings", "fused_groups", "unfuse_siblings"]
