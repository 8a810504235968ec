import pytest
import torch
from torch import nn

from rankwise.models.layers import LowRankLinear, factored_params, max_useful_rank


def full_rank_factors(linear: nn.Linear):
    U, S, Vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    return Vh, U * S


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_factorization_reproduces_the_layer(bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 16, bias=bias)
    A, B = full_rank_factors(linear)
    low = LowRankLinear.from_linear(linear, A, B)
    x = torch.randn(5, 3, 24)
    torch.testing.assert_close(low(x), linear(x), rtol=1e-5, atol=1e-5)
    merged = low.merge()
    torch.testing.assert_close(merged.weight, linear.weight, rtol=1e-5, atol=1e-5)
    assert (merged.bias is None) == (not bias)


def test_parameter_count_is_rank_times_sum_of_sides():
    low = LowRankLinear(100, 40, rank=7, bias=False)
    assert sum(p.numel() for p in low.parameters()) == factored_params(40, 100, 7) == 7 * 140


def test_max_useful_rank_is_the_last_rank_that_saves_parameters():
    for m, n in [(64, 64), (576, 1536), (192, 576), (7, 3)]:
        r = max_useful_rank(m, n)
        assert r * (m + n) < m * n <= (r + 1) * (m + n)


def test_mismatched_factors_are_rejected():
    linear = nn.Linear(8, 6)
    with pytest.raises(ValueError, match="do not match"):
        LowRankLinear.from_linear(linear, torch.zeros(2, 7), torch.zeros(6, 2))
