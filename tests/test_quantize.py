"""Factor rounding (rankwise.quantize) and its storage (rankwise.ct_format)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rankwise import CompressConfig, RankwiseError, compress_, load, save
from rankwise.config import StorageConfig
from rankwise.geometry import metric_error
from rankwise.quantize import (Grid, error_compensated, input_covariances,
                               quantize_factors, quantize_model, refit_outer, round_to_nearest,
                               round_weight)

from conftest import structured_tiny

pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [8, 4])
def test_error_compensated_rounding_beats_round_to_nearest_in_its_metric(bits):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2000, 96, generator=g) @ torch.randn(96, 96, generator=g)   # correlated
    H = (X.T @ X / len(X)).double()
    W = torch.randn(40, 96, generator=g)
    grid = Grid.for_bits(bits, 32)
    compensated = error_compensated(W, H, grid, torch.bfloat16)
    nearest = round_to_nearest(W, grid, torch.bfloat16)
    assert metric_error(W.double(), compensated.weight.double(), right=H) < \
        0.8 * metric_error(W.double(), nearest.weight.double(), right=H)
    for rounded in (compensated, nearest):           # on the grid: integers times the scales
        q = rounded.weight.unflatten(1, (-1, rounded.group)) / rounded.scale[:, :, None]
        assert torch.allclose(q, q.round(), atol=1e-4)
        assert q.round().min() >= -2 ** (bits - 1) and q.round().max() <= 2 ** (bits - 1) - 1
        assert torch.equal(rounded.scale, rounded.scale.to(torch.bfloat16).float())
    assert compensated.scale.shape == ((40, 1) if bits == 8 else (40, 3))


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


def test_error_compensation_worse_than_round_to_nearest_is_not_kept(monkeypatch):
    """Whatever the compensation returns (it is greedy and unbounded), the matrix kept is the better of it and round-to-nearest in H, and the tally says which."""
    import rankwise.quantize as quantize
    g = torch.Generator().manual_seed(0)
    W, H = torch.randn(8, 32, generator=g), torch.eye(32, dtype=torch.float64)
    grid = Grid.for_bits(4, 16)
    nearest = round_to_nearest(W, grid, torch.bfloat16)
    cascaded = quantize.Rounded(nearest.weight.roll(1, 1), nearest.scale, nearest.group, "gptq")
    monkeypatch.setattr(quantize, "error_compensated", lambda *a, **k: cascaded)
    kept = round_weight(W, H, grid, torch.bfloat16, "gptq")
    assert torch.equal(kept.weight, nearest.weight) and kept.rounding == "rtn"
    tally = quantize.Tally()
    tally.add(kept, "gptq")
    assert (tally.matrices, tally.nearest_kept) == (1, 1)


def test_a_group_width_always_divides_the_inputs():
    grid = Grid.for_bits(4, 64)
    assert [grid.group_for(n) for n in (576, 1536, 96, 32)] == [64, 64, 48, 32]
    assert grid.group_for(77) == 77          # divisors 7 and 11: too small, one scale per row
    assert Grid.for_bits(8, 64).group_for(77) == 77


def test_bad_factor_bits_and_rounding_are_clear_errors():
    with pytest.raises(RankwiseError, match="factor_bits must be one of"):
        StorageConfig(factor_bits=3)
    with pytest.raises(RankwiseError, match="rounding"):
        StorageConfig(rounding="best")
    with pytest.raises(RankwiseError, match="a grid holds 2 to 8 bits"):
        Grid(1, None)


def _factored(calib, ratio=0.4):
    model = structured_tiny("llama", tie_word_embeddings=True)
    model.tie_weights()
    compress_(model, CompressConfig(metric="kfac", ratio=ratio, allocation="uniform",
                                    rank_multiple=8), calib, progress=False)
    return model


def test_input_covariance_weighs_each_token_by_its_output_gradient(calib):
    """H = sum_t |g_t|^2 x_t x_t^T / sum_t |g_t|^2, g the gradient at the layer's output of
    the cross-entropy against labels sampled from the model: checked against autograd,
    with the labels drawn as input_covariances draws them."""
    from rankwise.stats import sample_logit_gradient
    model = _factored(calib)
    covariances = input_covariances(model, calib, 4)
    # weights untouched: no gradient left on them, each still asking for one as before
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    layer = model.model.layers[1].self_attn.o_proj
    seen = []

    def keep(module, args, out):
        out.retain_grad()
        seen.append((args[0], out))
    handle = layer.register_forward_hook(keep)
    generator = torch.Generator().manual_seed(0)
    for ids in calib.split(4):
        logits = model(input_ids=ids, use_cache=False).logits
        logits.backward(sample_logit_gradient(logits, generator))
    handle.remove()
    x = torch.cat([a.detach().reshape(-1, a.shape[-1]) for a, _ in seen]).double()
    w = torch.cat([out.grad.reshape(-1, out.shape[-1]) for _, out in seen]).double().square().sum(1)
    expected = (x * w[:, None]).T @ x / w.sum()
    torch.testing.assert_close(covariances["model.layers.1.self_attn.o_proj"], expected,
                               rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert not torch.allclose(expected, x.T @ x / len(x), rtol=0.05)   # the weights matter


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_factors_save_small_and_load_with_identical_logits(tmp_path, calib, bits):
    model = _factored(calib)
    with torch.no_grad():
        before = model(calib).logits
    tally = quantize_model(model, Grid.for_bits(bits, 8), calib, 4, torch.bfloat16)
    assert tally.matrices == 2 * 14 and 0 <= tally.nearest_kept <= tally.matrices
    folder = save(model, tmp_path / "q", {"targeted_params": {"dense": 2 * 7 * 64 * 96}},
                  storage=torch.bfloat16)
    loaded = load(folder)
    with torch.no_grad():
        mine, theirs = model(calib).logits, loaded(calib).logits
    assert torch.equal(mine, theirs)
    error = (mine - before).norm() / before.norm()
    assert 0 < error < (0.01 if bits == 8 else 0.15)      # round to nearest: 0.015 and 0.22
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    from safetensors import safe_open
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.mlp.down_proj.B.weight_packed" in keys
        assert "model.layers.0.mlp.down_proj.B.weight" not in keys
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    stored = json.loads((folder / "rankwise.json").read_text())["storage"]
    assert stored["bits_per_targeted_param"] < 0.6 * (bits + 1)
    with pytest.raises(RankwiseError, match="already holds quantized factors"):
        quantize_factors(loaded, None, Grid.for_bits(bits, 8), torch.bfloat16, "rtn")


def test_storage_dtype_rounds_the_model_in_memory_to_what_is_saved(tmp_path, calib):
    model = _factored(calib)
    folder = save(model, tmp_path / "b", storage=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.float32        # still runs as it did
    assert torch.equal(model.model.embed_tokens.weight,
                       model.model.embed_tokens.weight.bfloat16().float())
    with torch.no_grad():
        assert torch.equal(model(calib).logits, load(folder)(calib).logits)
    size16 = os.path.getsize(folder / "model.safetensors")
    size32 = os.path.getsize(save(model, tmp_path / "f") / "model.safetensors")
    assert size16 < 0.55 * size32


def test_plain_transformers_loads_quantized_factors_with_the_package(tmp_path, calib):
    model = _factored(calib)
    quantize_model(model, Grid.for_bits(4, 8), calib, 4, torch.bfloat16)
    folder = save(model, tmp_path / "q", storage=torch.bfloat16)
    torch.save(calib, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['rankwise'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True,"
        " dtype=torch.float32)\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(input_ids=ids).logits, {str(tmp_path / 'hf.pt')!r})\n")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    with torch.no_grad():
        mine = load(folder)(calib).logits
    assert (torch.load(tmp_path / "hf.pt") - mine).abs().max() < 1e-3


def test_a_missing_package_is_one_sentence(tmp_path, calib, monkeypatch):
    model = _factored(calib)
    quantize_model(model, Grid.for_bits(8, 8), calib, 4, torch.bfloat16, rounding="rtn")
    folder = save(model, tmp_path / "q", storage=torch.bfloat16)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    with pytest.raises(RankwiseError, match="pip install compressed-tensors"):
        load(folder)


def test_layers_the_allocation_kept_dense_are_rounded_too(tmp_path, calib):
    """Every targeted layer is stored in the bits asked: a layer left dense goes onto the
    same grid (and through the same storage) as the factors."""
    from rankwise.quantize import is_quantized, kept_dense
    model = structured_tiny("llama")
    compress_(model, CompressConfig(metric="kfac", ratio=0.4, allocation="uniform",
                                    exclude="down_proj"), calib, progress=False)
    dense = kept_dense(model, {})
    assert sorted(dense) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    quantize_model(model, Grid.for_bits(8, 8), calib, 4, torch.bfloat16, "gptq", dense)
    assert all(is_quantized(m) for m in dense.values())
    folder = save(model, tmp_path / "q", storage=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(model(calib).logits, load(folder)(calib).logits)
