import copy

import pytest
import torch

from rankwise import CompressConfig, RankwiseError, compress_
from rankwise.forms.allocate import achieved_ratio, spectrum_ranks, uniform_ranks
from rankwise.models.layers import factored_params


def random_spectra(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(min(s), generator=g, dtype=torch.float64).sort(descending=True).values
               * torch.rand(1, generator=g, dtype=torch.float64) * 10
            for k, s in shapes.items()}


SHAPES = {f"l{i}": s for i, s in enumerate([(64, 64), (32, 64), (128, 64), (64, 128), (48, 96)])}


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.8])
def test_spectrum_allocation_meets_the_budget_within_one_rank_step(ratio):
    ranks = spectrum_ranks(SHAPES, random_spectra(SHAPES), ratio)
    step = max(m + n for m, n in SHAPES.values()) / sum(m * n for m, n in SHAPES.values())
    assert 0 <= achieved_ratio(SHAPES, ranks) - ratio <= step


def test_spectrum_allocation_beats_uniform_in_predicted_loss():
    spectra = random_spectra(SHAPES, seed=3)
    loss = lambda ranks: sum(float(spectra[k][r:].sum()) if r else 0.0 for k, r in ranks.items())
    glob = spectrum_ranks(SHAPES, spectra, 0.4)
    assert loss(glob) < loss(uniform_ranks(SHAPES, 0.4))


def test_spectrum_cuts_the_layer_that_is_exactly_low_rank(tiny):
    target = "model.layers.1.mlp.gate_proj"
    layer = tiny.get_submodule(target)
    m, n = layer.weight.shape
    with torch.no_grad():
        layer.weight.copy_(torch.randn(m, 2) @ torch.randn(2, n))
    total = sum(l.weight.numel() for name, l in tiny.named_modules()
                if isinstance(l, torch.nn.Linear) and ".layers." in name)
    ratio = 0.5 * (m * n - factored_params(m, n, 2)) / total
    summary = compress_(tiny, CompressConfig(metric="svd", ratio=ratio, allocation="spectrum"),
                        progress=False)
    assert summary.ranks[target] is not None and summary.ranks[target] >= 2
    assert all(r is None for k, r in summary.ranks.items() if k != target)
    assert summary.predicted_loss < 1e-8 * float(layer.weight.detach().square().sum())


def test_spectrum_allocation_on_a_model_and_infeasible_floor(tiny, calib):
    model = copy.deepcopy(tiny)
    summary = compress_(model, CompressConfig(metric="kfac", ratio=0.5, allocation="spectrum"),
                        calib, progress=False)
    assert 0.5 <= summary.achieved_ratio < 0.52
    assert len(set(summary.ranks.values())) > 2     # ranks differ across layers
    with pytest.raises(RankwiseError, match="cannot be reached"):
        compress_(tiny, CompressConfig(metric="svd", ratio=0.9, allocation="spectrum",
                                       min_rank=30), progress=False)


def test_one_step_equals_the_one_shot_path(tiny, calib):
    from rankwise.models.blocks import target_linears
    from rankwise.statistics import hooks as stats
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    compress_(a, CompressConfig(metric="kfac", ratio=0.4, steps=1, cut="oneshot"), calib,
              progress=False)
    precomputed = stats.collect(b, target_linears(b), calib.split(4), gradients="full",
                                progress=False)
    compress_(b, CompressConfig(metric="kfac", ratio=0.4, cut="oneshot"), precomputed=precomputed,
              progress=False)
    with torch.no_grad():
        assert torch.equal(a(calib).logits, b(calib).logits)


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_multi_step_reduction_meets_the_budget(tiny, calib, allocation):
    summary = compress_(tiny, CompressConfig(metric="kfac", ratio=0.5, steps=3,
                                             allocation=allocation), calib, progress=False)
    shapes = summary.shapes.values()
    step = sum(m + n for m, n in shapes) / sum(m * n for m, n in shapes)
    assert 0.5 <= summary.achieved_ratio <= 0.5 + len(summary.shapes) * step
    assert summary.compressed_params == sum(
        p.numel() for n, p in tiny.named_parameters() if any(n.startswith(k) for k in summary.ranks))
    with torch.no_grad():
        assert torch.isfinite(tiny(calib).logits).all()


@pytest.mark.parametrize("multiple", [4, 16])
@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_rank_multiples_meet_the_budget(multiple, allocation):
    from rankwise.forms.allocate import ALLOCATIONS
    ranks = ALLOCATIONS[allocation].choose(SHAPES, random_spectra(SHAPES, seed=5), 0.4,
                                           multiple=multiple)
    assert all(r is None or r % multiple == 0 for r in ranks.values())
    assert achieved_ratio(SHAPES, ranks) >= 0.4
    step = multiple * max(m + n for m, n in SHAPES.values()) / sum(m * n for m, n in SHAPES.values())
    assert achieved_ratio(SHAPES, ranks) - 0.4 <= (len(SHAPES) if allocation == "uniform" else 1) * step


@pytest.mark.parametrize("allocation", ["uniform", "spectrum"])
def test_by_default_layers_from_1024_wide_get_ranks_in_tiles_of_64(allocation):
    from rankwise.forms.allocate import ALLOCATIONS, rank_multiples
    shapes = {"q": (2048, 2048), "k": (256, 2048), "up": (5632, 2048), "down": (2048, 5632),
              "small": (576, 1536)}
    multiples = rank_multiples(shapes, 0)
    assert multiples == {"q": 64, "k": 1, "up": 64, "down": 64, "small": 1}
    assert rank_multiples(shapes, 16) == dict.fromkeys(shapes, 16)
    ranks = ALLOCATIONS[allocation].choose(shapes, random_spectra(shapes, seed=3), 0.4,
                                           multiple=multiples)
    assert all(ranks[k] is None or ranks[k] % multiples[k] == 0 for k in shapes)
    assert 0.4 <= achieved_ratio(shapes, ranks) <= 0.4 + 64 * 7680 / sum(m * n for m, n in shapes.values())
    assert any(ranks[k] is not None and ranks[k] % 64 for k in ("k", "small"))
