"""Rank allocation under one global parameter budget over the targeted layers."""
from __future__ import annotations

import re

from .layers import dense_params, factored_params, max_useful_rank


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """Every layer loses the same fraction `ratio` of its parameters (rounded down to a
    whole rank, so the achieved ratio is at least the requested one). None = keep dense."""
    ranks = {}
    for name, (m, n) in shapes.items():
        r = int((1 - ratio) * m * n // (m + n))
        ranks[name] = min(r, max_useful_rank(m, n)) if r >= 1 else 1
    return ranks


def apply_rank_pattern(ranks: dict[str, int | None], shapes: dict[str, tuple[int, int]],
                       rank_pattern: dict[str, int]) -> dict[str, int | None]:
    """Explicit {regex: rank} overrides; the first matching pattern wins; a rank that would
    not save parameters keeps the layer dense."""
    out = dict(ranks)
    for name in ranks:
        for pattern, rank in rank_pattern.items():
            if re.search(pattern, name):
                m, n = shapes[name]
                out[name] = rank if rank <= max_useful_rank(m, n) else None
                break
    return out


def achieved_ratio(shapes: dict[str, tuple[int, int]], ranks: dict[str, int | None]) -> float:
    dense = sum(dense_params(m, n) for m, n in shapes.values())
    kept = sum(dense_params(m, n) if ranks.get(k) is None else factored_params(m, n, ranks[k])
               for k, (m, n) in shapes.items())
    return 1 - kept / dense
