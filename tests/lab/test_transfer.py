import pytest
import torch
from torch import nn

from rankwise.errors import RankwiseError
from rankwise.lab.transfer import (WIDE_LAYERS, DeepLowRankLinear, compress_wide_,
                                   run_transfer, spectral_block, two_timescale_groups)
from rankwise.lab.vision import ViT, build_model, load_images


@pytest.fixture(scope="module")
def digits():
    return load_images("digits")


def test_digits_split_is_stratified_and_standardised(digits):
    assert digits.x_train.shape[1] == 64 and len(digits.y_train) + len(digits.y_test) == 1797
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    assert abs(float(digits.x_train.mean())) < 1e-4 and abs(float(digits.x_train.std()) - 1) < 1e-3
    again = load_images("digits")
    assert torch.equal(again.x_test, digits.x_test)


def test_unknown_data_set_is_a_clear_error():
    with pytest.raises(RankwiseError, match="unknown data set"):
        load_images("imagenet")


def test_spectral_block_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    linear = nn.Linear(30, 20)
    block = spectral_block(linear, 5, depth=4)
    U, S, Vh = torch.linalg.svd(linear.weight.detach())
    torch.testing.assert_close(block.weight, (U[:, :5] * S[:5]) @ Vh[:5], rtol=1e-5, atol=1e-5)
    full = spectral_block(linear, 20, depth=3)
    x = torch.randn(7, 30)
    torch.testing.assert_close(full(x), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RankwiseError, match="width"):
        spectral_block(linear, 21)


def test_compressing_wide_layers_counts_and_timescales(digits):
    model = build_model("mlp", digits, width=48, depth=2)
    counts = compress_wide_(model, WIDE_LAYERS["mlp"], width=8, depth=3)
    assert counts == {"hidden.0": (48 * 64, 8 * (48 + 64) + 64),
                      "hidden.1": (48 * 48, 8 * (48 + 48) + 64)}
    assert isinstance(model.hidden[0], DeepLowRankLinear) and isinstance(model.head, nn.Linear)
    fast, slow = two_timescale_groups(model, lr=0.01, alpha=3.0)
    assert fast["lr"] == pytest.approx(0.03) and slow["lr"] == 0.01
    assert len(fast["params"]) == 4
    assert len(fast["params"]) + len(slow["params"]) == len(list(model.parameters()))
    assert model(digits.x_test[:5]).shape == (5, 10)


def test_vit_compresses_its_mlp_layers(digits):
    model = build_model("vit", digits, dim=16, depth=2, heads=2, mlp_width=64)
    counts = compress_wide_(model, WIDE_LAYERS["vit"], width=4)
    assert sorted(counts) == ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    assert model(digits.x_test[:3]).shape == (3, 10)
    with pytest.raises(RankwiseError, match="patch"):
        ViT(8, patch=3)


def test_compressed_mlp_trains_to_an_accuracy_near_the_original(digits):
    original, compressed = run_transfer(digits, "mlp", width=16, epochs=10, warmup_steps=5,
                                        batch_size=32, model_kw={"width": 128, "depth": 2})
    assert original.accuracy > 0.95
    assert compressed.accuracy > original.accuracy - 0.05
    assert compressed.wide_params < original.wide_params / 2
    assert len(compressed.history.test_accuracy) == 10
