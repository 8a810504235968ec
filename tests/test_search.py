import random

import pytest
import torch

from rankwise import CompressConfig, compress_
from rankwise.cut.search import Budget
from rankwise.errors import RankwiseError


def test_mutations_never_exceed_the_parents_spend():
    shapes = {"q": (64, 64), "k": (32, 64), "up": (128, 64), "down": (64, 128)}
    budget = Budget(shapes, caps={}, min_rank=1)
    rng = random.Random(0)
    parent = {"q": 10, "k": None, "up": 20, "down": 5}
    spend = budget.total(parent)
    for _ in range(300):
        child = budget.mutate(parent, rng, quantum=400, moves=rng.randint(1, 3))
        assert budget.total(child) <= spend
        assert spend - budget.total(child) < max(m + n for m, n in shapes.values()) + 64 * 64
        assert all(r is None or 1 <= r <= budget.top[k] for k, r in child.items())
        parent, spend = child, budget.total(child)


def test_mutations_keep_each_layers_rank_multiple():
    shapes = {"q": (2048, 2048), "k": (256, 2048), "up": (5632, 2048), "down": (2048, 5632)}
    multiples = {"q": 64, "k": 1, "up": 64, "down": 64}
    budget = Budget(shapes, caps={}, min_rank=1, multiples=multiples)
    rng = random.Random(2)
    parent = {"q": 640, "k": 77, "up": None, "down": 1024}
    spend = budget.total(parent)
    moved = set()
    for _ in range(300):
        child = budget.mutate(parent, rng, quantum=40_000, moves=rng.randint(1, 3))
        assert budget.total(child) <= spend
        assert all(r is None or (r % multiples[k] == 0 and r <= budget.top[k])
                   for k, r in child.items())
        moved |= {k for k in child if child[k] != parent[k]}
        parent, spend = child, budget.total(child)
    assert moved == set(shapes)


def test_capped_layers_never_grow_back():
    shapes = {"a": (64, 64), "b": (64, 64)}
    budget = Budget(shapes, caps={"a": 4}, min_rank=1)
    rng = random.Random(1)
    ranks = {"a": 4, "b": 4}
    for _ in range(100):
        ranks = budget.mutate(ranks, rng, quantum=256, moves=2)
        assert ranks["a"] is not None and ranks["a"] <= 4


def _search(model, calib, **kw):
    config = CompressConfig(metric="kfac", ratio=0.4, allocation="search",
                            search_generations=3, search_offspring=3, **kw)
    return compress_(model, config, calib, progress=False)


def test_search_is_never_worse_than_its_seed_and_meets_the_budget(tiny):
    g = torch.Generator().manual_seed(3)
    calib = torch.randint(0, 256, (10, 32), generator=g)
    summary = _search(tiny, calib)
    result = summary.search
    assert result.fitness <= result.seed_fitness
    assert result.trace == sorted(result.trace, reverse=True)
    widest = max(m + n for m, n in summary.shapes.values())
    assert 0.4 <= summary.achieved_ratio < 0.4 + widest / summary.dense_params


def test_search_is_reproducible_from_its_seed():
    from conftest import structured_tiny
    g = torch.Generator().manual_seed(4)
    calib = torch.randint(0, 256, (10, 32), generator=g)
    runs = [_search(structured_tiny("llama"), calib) for _ in range(2)]
    assert runs[0].ranks == runs[1].ranks
    assert runs[0].search.fitness == runs[1].search.fitness


def test_search_needs_held_out_windows(tiny):
    with pytest.raises(RankwiseError, match="holds out 4 calibration windows"):
        _search(tiny, torch.zeros(4, 16, dtype=torch.long))
    with pytest.raises(RankwiseError, match="seeded from the metric"):
        CompressConfig(metric="svd", allocation="search")
