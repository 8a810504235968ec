"""Rounding a weight onto a grid in its metric (rankwise.forms.rounding, rankwise.forms.grids)."""
import pytest
import torch

from rankwise import CompressConfig, RankwiseError
from rankwise.formats.storage import StorageConfig
from rankwise.forms.grids import Grid
from rankwise.forms.rounding import (Rounded, Tally, error_compensated, refit_outer,
                                     round_factors, round_to_nearest, round_weight)
from rankwise.geometry import metric_error


def _problem(n=96, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2000, n, generator=g) @ torch.randn(n, n, generator=g)   # correlated
    return torch.randn(m, n, generator=g), (X.T @ X / len(X)).double()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_error_compensated_rounding_beats_round_to_nearest_in_its_metric(bits):
    W, H = _problem()
    grid = Grid.for_bits(bits, 32)
    compensated = error_compensated(W, H, grid, torch.bfloat16)
    nearest = round_to_nearest(W, grid, torch.bfloat16)
    margin = 0.8 if bits > 2 else 0.9       # two bits leave little to compensate with
    assert metric_error(W.double(), compensated.weight.double(), right=H) < \
        margin * metric_error(W.double(), nearest.weight.double(), right=H)
    for rounded in (compensated, nearest):           # on the grid: integers times the scales
        g = rounded.grid.group_for(W.shape[1])
        q = rounded.weight.unflatten(1, (-1, g)) / rounded.scale[:, :, None]
        assert torch.allclose(q, q.round(), atol=1e-4)
        assert q.round().min() >= -2 ** (bits - 1) and q.round().max() <= 2 ** (bits - 1) - 1
        assert torch.equal(rounded.scale, rounded.scale.to(torch.bfloat16).float())
    assert compensated.scale.shape == ((40, 1) if bits == 8 else (40, 3))


def test_every_tensor_of_the_rounding_is_made_where_the_weight_is():
    """A GPU runs the rounding with its weights on the device; a tensor made on the default
    device (the CPU there) fails it, after the whole compression. Here the default device
    is `meta`, so any tensor not made beside the weight meets a CPU tensor and fails."""
    W, H = _problem(64, 24)
    expected = error_compensated(W, H, Grid.for_bits(4, 32), torch.bfloat16)
    with torch.device("meta"):
        got = error_compensated(W, H, Grid.for_bits(4, 32), torch.bfloat16)
        refit = refit_outer(torch.randn(5, 3, device="cpu"), torch.randn(3, 64, device="cpu"),
                            torch.randn(3, 64, device="cpu"), H)
    assert torch.equal(got.weight, expected.weight) and refit.device.type == "cpu"


def test_the_outer_factor_refitted_to_the_rounded_inner_one_loses_less():
    """B' = argmin E||B A x - B' Â x||^2: the layer's output error with B' is below the one
    with B (both unrounded), and B' = B when Â = A."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 48, generator=g) @ torch.randn(48, 48, generator=g)
    C = (X.T @ X / len(X)).double()
    A, B = torch.randn(12, 48, generator=g).double(), torch.randn(30, 12, generator=g).double()
    A_rounded = round_to_nearest(A, Grid.for_bits(4, 16), torch.bfloat16).weight.double()
    refit = refit_outer(B, A, A_rounded, C)
    assert metric_error(B @ A, refit @ A_rounded, right=C) < \
        0.9 * metric_error(B @ A, B @ A_rounded, right=C)
    torch.testing.assert_close(refit_outer(B, A, A, C), B)


def test_rounded_factors_lose_less_of_the_layers_output_than_rounded_to_nearest():
    W, H = _problem(64, 48)
    U, S, Vh = torch.linalg.svd(W.double())
    B, A = (U[:, :32] * S[:32].sqrt()).float(), (S[:32, None].sqrt() * Vh[:32]).float()
    grid = Grid.for_bits(4, 32)
    errors = {}
    for rounding in ("gptq", "rtn"):
        a, b = round_factors(A, B, H, grid, torch.bfloat16, rounding)
        errors[rounding] = metric_error(B.double() @ A.double(), b.weight.double() @ a.weight.double(),
                                        right=H)
    assert errors["gptq"] < 0.7 * errors["rtn"]


def test_error_compensation_worse_than_round_to_nearest_is_not_kept(monkeypatch):
    """Whatever the compensation returns (it is greedy and unbounded), the matrix kept is
    the better of it and round-to-nearest in H, and the tally says which."""
    import rankwise.forms.rounding as rounding
    g = torch.Generator().manual_seed(0)
    W, H = torch.randn(8, 32, generator=g), torch.eye(32, dtype=torch.float64)
    grid = Grid.for_bits(4, 16)
    nearest = round_to_nearest(W, grid, torch.bfloat16)
    cascaded = Rounded(nearest.weight.roll(1, 1), nearest.scale, nearest.grid, "gptq")
    monkeypatch.setattr(rounding, "error_compensated", lambda *a, **k: cascaded)
    kept = round_weight(W, H, grid, torch.bfloat16, "gptq")
    assert torch.equal(kept.weight, nearest.weight) and kept.rounding == "rtn"
    tally = Tally()
    tally.add(kept, "gptq")
    assert (tally.matrices, tally.nearest_kept) == (1, 1)


def test_groups_are_the_kernels_widths_or_a_scale_per_row():
    """A group the serving kernels accept where it divides the width; one scale per row
    (the channel strategy) where it does not, never an odd group."""
    grid = Grid.for_bits(4, 64)
    assert [grid.group_for(n) for n in (576, 1536, 128)] == [64, 64, 64]
    assert grid.fitted(96) == Grid(4, None) and grid.group_for(96) == 96
    assert Grid.for_bits(8, 64).group_size is None
    rounded = round_to_nearest(torch.randn(3, 96), grid, torch.bfloat16)
    assert rounded.grid == Grid(4, None) and rounded.scale.shape == (3, 1)
    # packed densely into 32-bit words per row, a 16-bit scale per group
    assert Grid(3, 64).stored_bits(10, 576) == 10 * 54 * 32 + 10 * 9 * 16 + 128   # + shape


@pytest.mark.parametrize("bad, message", [
    (dict(factor_bits=5), "factor_bits must be one of"),
    (dict(bits=4, forms=["pruned"]), "forms must be a list of"),
    (dict(rounding="best"), "rounding"),
    (dict(group_size=48), "group_size must be one of"),
    (dict(weight_bits=[5]), "weight_bits must be a list"),
])
def test_bad_rounding_options_are_one_sentence(bad, message):
    with pytest.raises(RankwiseError, match=message):
        CompressConfig(**bad)
    with pytest.raises(RankwiseError, match="a grid holds 2 to 8 bits"):
        Grid(1, None)
    with pytest.raises(RankwiseError, match="save_dtype"):
        StorageConfig(save_dtype="int4")


def test_a_scale_clips_an_outlier_when_that_leaves_less_error_and_never_more_than_the_maximum():
    """The scale is the least-error one among the largest magnitude and clipped versions of
    it: never worse than the largest magnitude's step, and clipping a row with one outlier."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=g)
    w[0, 0] = 12.0                                          # one outlier in row 0
    grid = Grid(3, 64)
    chosen = grid.scale(w, torch.float16)
    widest = (w.abs().amax(1) / grid.qmax).half().float()
    left = lambda step: (w - grid.round(w, step)).square().sum(1)      # noqa: E731
    assert (left(chosen) <= left(widest) + 1e-6).all()
    assert chosen[0] < widest[0] and float(left(chosen).sum()) < float(left(widest).sum())
