"""Loaded in a 16-bit dtype, an output keeps the rounded layers a kernel here runs packed
(4-bit groups, 8-bit rows), about their bytes on disk, computes what the float model
computes within bfloat16's resolution, and saves back to the same tensors."""
import logging

import pytest
import torch
from conftest import structured_tiny
from safetensors.torch import load_file
from torch import nn

from rankwise import CompressConfig, compress_, load, save
from rankwise.forms.packed import PackedLinear


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = structured_tiny("llama", hidden_size=128, intermediate_size=256)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    compress_(model, CompressConfig(bits=4.6, forms=["rounded"], weight_bits=[8, 4, 3],
                                    group_size=32, refine_steps=0), calib, progress=False,
              scale_dtype=torch.bfloat16)
    return save(model, tmp_path_factory.mktemp("packed") / "out", storage=torch.bfloat16)


def test_a_sixteen_bit_load_keeps_what_a_kernel_runs_packed(folder, caplog):
    floats = load(folder)
    with caplog.at_level(logging.INFO, logger="rankwise"):
        packed = load(folder, torch.bfloat16)
    grids = {name: m.rankwise_grid for name, m in floats.named_modules()
             if getattr(m, "rankwise_grid", None) is not None}
    assert {g.bits for g in grids.values()} == {8, 4, 3}
    for name, grid in grids.items():
        layer = packed.get_submodule(name)
        assert isinstance(layer, PackedLinear) == (grid.bits in (4, 8)), name
        if isinstance(layer, PackedLinear):
            held = sum(b.numel() * b.element_size() for b in layer.buffers())
            assert held * 8 <= layer.in_features * layer.out_features * grid.bits * 1.3
            assert torch.equal(layer.weight, floats.get_submodule(name).weight)
    assert "int3 in groups of 32" in caplog.text and "held as floats" in caplog.text
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = floats.to(torch.bfloat16)(ids).logits.float()
        got = packed(ids).logits.float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_packed_load_saves_back_to_the_same_tensors(folder, tmp_path):
    again = save(load(folder, torch.bfloat16), tmp_path / "again", storage=torch.bfloat16)
    first, second = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_a_float32_load_keeps_floats(folder):
    assert not any(isinstance(m, PackedLinear) for m in load(folder).modules())
    assert all(type(m) in (nn.Linear,) for n, m in load(folder).named_modules()
               if getattr(m, "rankwise_grid", None) is not None)
