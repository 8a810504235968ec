"""The registry of forms: a kind registered from outside the package is priced, chosen by a
budget in bits, made on the compressed stream, saved and loaded, without touching any
module but the registry's; the standalone modeling file refuses what it does not build."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import structured_tiny
from torch import nn

from rankwise import CompressConfig, compress_, load, save
from rankwise.forms.grids import Grid
from rankwise.forms.registry import KINDS, Form, Kind, form_of, register
from rankwise.forms.rounding import round_to_nearest
from rankwise.models.layers import CompositeLinear, linear_shape


class ScaledLinear(CompositeLinear):
    """A rounded weight Q with a rank-1 scale correction: W = Q * (u v^T), y = u * (Q (v * x))."""

    def __init__(self, in_features, out_features, rank=1, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, 1, device, dtype)
        self.base = self.part(in_features, out_features, False)
        self.u = nn.Parameter(torch.ones(out_features, device=self._kw["device"], dtype=dtype))
        self.v = nn.Parameter(torch.ones(in_features, device=self._kw["device"], dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=self._kw["device"],
                                             dtype=dtype)) if bias else None

    def forward(self, x):
        y = self.u * self.base(x * self.v)
        return y if self.bias is None else y + self.bias

    def factors(self):
        return [self.u, self.v]

    @property
    def weight(self):
        return self.base.weight * self.u[:, None] * self.v[None, :]


def _scales(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u, v of a rank-1 scale: the columns' then the rows' root mean squares, mean one."""
    v = W.pow(2).mean(0).sqrt().clamp_min(1e-12)
    v = v / v.mean()
    u = (W / v).pow(2).mean(1).sqrt().clamp_min(1e-12)
    return u / u.mean(), v


class Scaled(Kind):
    name = "scaled"
    help = "rounded with a rank-1 scale correction"
    ranked = rounds_weight = True
    module = ScaledLinear

    def stored_bits(self, form, shape, storage):
        m, n = shape
        return Grid.for_bits(form.bits, storage.group_size).stored_bits(m, n, storage.float_bits) \
            + storage.float_bits * (m + n)

    def recognise(self, module):
        return Form(self.name, 1, module.base.rankwise_grid.bits) \
            if type(module) is ScaledLinear else None

    def skeleton(self, linear, rank):
        m, n = linear_shape(linear)
        return ScaledLinear(n, m, 1, linear.bias is not None, dtype=linear.weight.dtype)

    def needs_fit(self, form, layer):
        return True

    def widths(self, weight_bits):
        return tuple(weight_bits)

    def measure(self, layer, widths):
        u, v = _scales(layer.W)
        scale = u[:, None] * v[None, :]
        prices = []
        for bits in widths:
            grid = Grid.for_bits(bits, layer.pricing.group_size)
            Q = round_to_nearest(layer.W / scale, grid, layer.pricing.scale_dtype).weight
            prices.append(layer.error_price(Q.to(layer.W) * scale))
        return [torch.tensor(prices, dtype=torch.float64)]

    def layout(self, shape, widths):
        return [(len(widths),)]

    def options(self, measured, shape, widths, group_size, rank_step, min_rank, cap):
        return [(Form(self.name, 1, b), float(p)) for b, p in zip(widths, measured[0])]

    def price(self, measured, widths, form):
        return float(measured[0][widths.index(form.bits)])

    def make(self, fit, name, form, solved):
        target = fit.anchored_target(name)
        u, v = _scales(target)
        rounded = fit.round(name, target / (u[:, None] * v[None, :]),
                            form.grid(fit.recipe.config.group_size))
        layer = fit.layer(name)
        new = ScaledLinear.from_parts(layer, rank=1, base=rounded.weight)
        with torch.no_grad():
            new.u.copy_(u)
            new.v.copy_(v)
        fit.store(new.base, rounded)
        fit.install(name, new, form, 0.0)


@pytest.fixture
def scaled():
    kind = register(Scaled())
    yield kind
    del KINDS[kind.name]


def test_a_form_registered_outside_the_package_is_chosen_made_saved_and_loaded(scaled, tmp_path):
    model = structured_tiny("llama", hidden_size=128, intermediate_size=256)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    summary = compress_(model, CompressConfig(bits=4.6, forms=["scaled"],
                                              weight_bits=[8, 4, 3], group_size=32),
                        calib, progress=False, scale_dtype=torch.bfloat16)
    chosen = {name: form for name, form in summary.forms.items() if form.kind == "scaled"}
    assert len(chosen) >= len(summary.forms) - 2, summary.forms     # all but a dense layer or two
    assert summary.bits <= 4.6
    for name in chosen:
        assert form_of(model.get_submodule(name)) == chosen[name]
    folder = save(model, tmp_path / "out", storage=torch.bfloat16)
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(model(calib).logits, loaded(calib).logits)
    layers = json.loads((folder / "config.json").read_text())["rankwise_layers"]
    assert {n for n, s in layers.items() if s["form"] == "scaled"} == set(chosen)
    # the standalone modeling file builds only the forms it holds: one sentence, not garbage
    code = ("import transformers\n"
            f"transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, "
            "trust_remote_code=True)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "form 'scaled' is not one this file builds" in result.stderr
