"""One budget in bits: every layer given the form the K-FAC metric prices cheapest
(rankwise.forms.pricing, rankwise.forms.allocate.knapsack), made on the two-stream walk, stored in
compressed-tensors, loaded by rankwise and by plain transformers."""
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import structured_tiny

from rankwise import CompressConfig, RankwiseError, compress_, load, save
from rankwise.cut.compress import Execution
from rankwise.formats.folder import read_manifest
from rankwise.formats.manifest import Manifest
from rankwise.forms.allocate import knapsack
from rankwise.forms.kinds import CorrectedLinear
from rankwise.forms.pricing import HeldOut, Pricing, price
from rankwise.forms.registry import Form, Storage
from rankwise.forms.rounding import is_quantized
from rankwise.models.layers import LowRankLinear
from rankwise.pipeline.placement import Placement

pytest.importorskip("compressed_tensors")

WIDE = dict(hidden_size=128, intermediate_size=256)      # room for groups of 32


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))


def bits_model(windows, bits=4.0, **kw):
    model = structured_tiny("llama", **WIDE)
    summary = compress_(model, CompressConfig(bits=bits, group_size=32, refine_steps=2, **kw),
                        windows, progress=False)
    return model, summary


@pytest.fixture(scope="module")
def made(windows):
    return bits_model(windows)


def test_the_budget_is_met_and_is_what_the_disk_holds(made, tmp_path):
    """The allocation's stored bits (packed integers, scales, 16-bit floats) are within
    the budget, spend nearly all of it, and are exactly what the written file holds."""
    model, summary = made
    assert 3.9 <= summary.bits <= 4.0
    kinds = {f.kind for f in summary.forms.values()}
    assert len(kinds) >= 2, kinds                     # a mixture, not one form everywhere
    folder = save(model, tmp_path / "b", Manifest(targeted_params={"dense": summary.dense_params},
                                                  forms=summary.layer_records()),
                  storage=torch.bfloat16)
    stored = json.loads((folder / "rankwise.json").read_text())["storage"]
    assert stored["bits_per_targeted_param"] == pytest.approx(summary.bits, rel=1e-12)


def test_each_layer_is_in_the_form_it_was_given(made):
    model, summary = made
    for name, form in summary.forms.items():
        layer = model.get_submodule(name)
        if form.kind == "lowrank":
            assert isinstance(layer, LowRankLinear) and layer.rank == form.rank
            assert is_quantized(layer.A) == (form.bits < 16)
            if form.bits == 4:
                assert form.rank % 32 == 0 and layer.B.rankwise_grid.group_size == 32
        elif form.kind == "corrected":
            assert isinstance(layer, CorrectedLinear) and layer.rank == form.rank
            assert layer.base.rankwise_grid.bits == form.bits and not is_quantized(layer.A)
        elif form.kind == "rounded":
            assert is_quantized(layer) and layer.rankwise_grid.bits == form.bits
        else:
            assert not is_quantized(layer)
        assert summary.made.priced[name] >= 0


def test_more_bits_buy_a_model_closer_to_the_dense_one(windows):
    dense = structured_tiny("llama", **WIDE)
    with torch.no_grad():
        reference = torch.log_softmax(dense(windows).logits, -1)

    def kl(model):
        with torch.no_grad():
            logp = torch.log_softmax(model(windows).logits, -1)
        return float((reference.exp() * (reference - logp)).sum(-1).mean())
    kls = [kl(bits_model(windows, bits)[0]) for bits in (3.0, 4.5, 8.5)]
    assert kls[0] > kls[1] > kls[2]


def test_saved_then_loaded_gives_identical_logits_and_plain_transformers_agrees(made, windows,
                                                                               tmp_path):
    model, _ = made
    folder = save(model, tmp_path / "q", storage=torch.bfloat16)
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(model(windows).logits, loaded(windows).logits)
    config = json.loads((folder / "config.json").read_text())
    assert {n: s["rank"] for n, s in config["rankwise_layers"].items()
            if s["form"] == "corrected"} == {n: m.rank for n, m in model.named_modules()
                                             if isinstance(m, CorrectedLinear)}
    schemes = config["quantization_config"]["config_groups"].values()
    assert {s["weights"]["group_size"] for s in schemes} <= {32, None}
    assert all((s["weights"]["strategy"] == "channel") == (s["weights"]["group_size"] is None)
               for s in schemes)
    torch.save(windows, tmp_path / "ids.pt")
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
        mine = loaded(windows).logits
    assert (torch.load(tmp_path / "hf.pt") - mine).abs().max() < 1e-3


def test_the_device_route_gives_what_the_resident_one_gives(windows):
    """Onloaded with every move a real copy (the route a GPU takes: pricing, rounding and
    corrections on the device, the model at home) gives the resident model's logits."""
    resident, _ = bits_model(windows)
    model = structured_tiny("llama", **WIDE)
    compress_(model, CompressConfig(bits=4.0, group_size=32, refine_steps=2), windows,
              progress=False, execution=Execution(placement=Placement("cpu", copy=True)))
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, resident(windows).logits)


def test_the_knapsack_spends_within_the_budget_and_no_fitting_change_helps():
    """Against brute force on small instances: within the budget, never worse than the
    best single-option-per-layer Lagrangian point, and no single change of one layer's
    option that still fits lowers the total price."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        costs = [torch.rand(5, generator=g) * 10 for _ in range(4)]
        prices = [torch.rand(5, generator=g) * 10 for _ in range(4)]
        budget = float(sum(c.min() for c in costs)) + 8.0
        chosen = knapsack(costs, prices, budget)
        spent = sum(float(c[i]) for c, i in zip(costs, chosen))
        total = sum(float(p[i]) for p, i in zip(prices, chosen))
        assert spent <= budget + 1e-9
        best = min(sum(float(p[i]) for p, i in zip(prices, pick))
                   for pick in itertools.product(range(5), repeat=4)
                   if sum(float(c[i]) for c, i in zip(costs, pick)) <= budget)
        assert total <= 1.6 * best + 1e-9
        for layer, option in itertools.product(range(4), range(5)):
            extra = float(costs[layer][option] - costs[layer][chosen[layer]])
            if spent + extra <= budget:
                assert float(prices[layer][option]) >= float(prices[layer][chosen[layer]]) - 1e-9


@pytest.mark.parametrize("bad, message", [
    (dict(bits=4, ratio=0.2), "--ratio or as --bits, not both"),
    (dict(bits=4, metric="whiten"), "takes no --metric"),
    (dict(bits=4, cut="oneshot"), "takes no --cut"),
    (dict(bits=4, factor_bits=4), "takes no --factor-bits"),
    (dict(bits=4, allocation="search"), "takes no --allocation"),
    (dict(bits=0.5), "bits must be in"),
    (dict(ratio=0.0), "ratio 0 removes nothing"),
])
def test_a_budget_that_cannot_be_is_one_sentence(bad, message):
    with pytest.raises(RankwiseError, match=message):
        CompressConfig(**bad)


def test_bits_below_what_any_form_makes_is_one_sentence(windows):
    model = structured_tiny("llama", **WIDE)
    with pytest.raises(RankwiseError, match="below the smallest model these forms make"):
        compress_(model, CompressConfig(bits=1.01, group_size=32, weight_bits=[8], min_rank=32),
                  windows,
                  progress=False)


def test_a_form_costs_what_its_parts_are_stored_in():
    shape, s16, s32 = (96, 128), Storage(32), Storage(32, 32)
    assert Form("dense").stored_bits(shape, s16) == 16 * 96 * 128
    assert Form("dense").stored_bits(shape, s32) == 32 * 96 * 128
    assert Form("rounded", None, 4).stored_bits(shape, s16) == 96 * 128 * 4 + 96 * 4 * 16 + 128
    assert Form("rounded", None, 4).stored_bits(shape, s32) == 96 * 128 * 4 + 96 * 4 * 32 + 128
    assert Form("lowrank", 32, 16).stored_bits(shape, s16) == 16 * 32 * (96 + 128)
    assert Form("lowrank", 32, 4).stored_bits(shape, s16) == \
        (32 * 128 * 4 + 32 * 4 * 16 + 128) + (96 * 32 * 4 + 96 * 1 * 16 + 128)
    assert Form("corrected", 8, 3).stored_bits(shape, s16) == \
        Form("rounded", None, 3).stored_bits(shape, s16) + 16 * 8 * (96 + 128)
    assert Form("corrected", 8, 3).stored_bits(shape, s16, bias=True) == \
        Form("corrected", 8, 3).stored_bits(shape, s16) + 16 * 96


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    from conftest import word_tokenizer
    folder = tmp_path_factory.mktemp("wide-hf")
    structured_tiny("llama", **WIDE).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def _cli(capsys, *argv):
    from rankwise.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


CALIB = ["--calib-samples", "8", "--seqlen", "64", "--refine-steps", "2"]


def test_the_verbs_compress_to_bits_and_quantize_an_output(wide_folder, tmp_path, capsys):
    """compress --bits writes each layer's form, bits and predicted loss; quantize --bits
    takes a float output where its forms allow (a factored layer stays factors, of its rank
    or lower), quantize --factor-bits rounds the layers as they are, and an output already
    rounded is refused in one sentence."""
    code, text, _ = _cli(capsys, "compress", "--model", wide_folder, *CALIB, "--bits", "4",
                         "--group-size", "32", "--out", tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "rankwise.json").read_text())
    assert code == 0 and "bits per original parameter" in text
    assert manifest["bits"] <= 4 and len(manifest["forms"]) == 14
    assert all({"form", "bits", "stored_bits"} <= set(r) for r in manifest["forms"].values())
    assert manifest["storage"]["bits_per_targeted_param"] == pytest.approx(manifest["bits"])
    code, _, err = _cli(capsys, "quantize", tmp_path / "b", "--bits", "3", "--windows", "4",
                        "--seqlen", "64", "--out", tmp_path / "again")
    assert code == 2 and "holds rounded weights" in err
    assert _cli(capsys, "compress", "--model", wide_folder, *CALIB, "--ratio", "0.3",
                "--out", tmp_path / "f")[0] == 0
    ranks = read_manifest(tmp_path / "f").ranks
    code, text, _ = _cli(capsys, "quantize", tmp_path / "f", "--bits", "5", "--group-size", "32",
                         "--windows", "8", "--seqlen", "64", "--out", tmp_path / "q")
    record = json.loads((tmp_path / "q" / "rankwise.json").read_text())
    assert code == 0 and record["bits"] <= 5
    for name, rank in ranks.items():
        assert record["forms"][name]["form"] == "lowrank" and record["forms"][name]["rank"] <= rank
    code, _, _ = _cli(capsys, "quantize", tmp_path / "f", "--factor-bits", "8", "--windows", "8",
                      "--seqlen", "64", "--out", tmp_path / "r")
    record = json.loads((tmp_path / "r" / "rankwise.json").read_text())
    assert code == 0 and read_manifest(tmp_path / "r").ranks == ranks
    assert all(r["bits"] == 8 for r in record["forms"].values())
    code, _, err = _cli(capsys, "quantize", tmp_path / "f", "--out", tmp_path / "x")
    assert code == 2 and "one of --bits" in err


def test_budgets_made_from_one_measurement_equal_their_own_compressions(windows):
    """The first walk measured once (every layer's menu, the parked statistics) gives each
    budget what a compression of its own gives; a mixed-precision row takes the same
    measurement with fewer forms offered; a measurement of other windows is refused."""
    from rankwise.cut.choosing import Measurement
    kw = dict(group_size=32, refine_steps=2)
    with Measurement() as measurement:
        for bits, forms in ((4.0, None), (3.75, ["rounded"])):
            model = structured_tiny("llama", **WIDE)
            extra = {"forms": forms} if forms else {}
            compress_(model, CompressConfig(bits=bits, **extra, **kw), windows, progress=False,
                      measurement=measurement)
            alone = structured_tiny("llama", **WIDE)
            compress_(alone, CompressConfig(bits=bits, **extra, **kw), windows, progress=False)
            with torch.no_grad():
                assert torch.equal(model(windows).logits, alone(windows).logits), bits
        with pytest.raises(RankwiseError, match="other layers, windows or forms"):
            compress_(structured_tiny("llama", **WIDE), CompressConfig(bits=4.0, **kw),
                      windows.roll(1, 0), progress=False, measurement=measurement)


def test_corrections_exported_as_a_peft_lora_adapter_over_the_rounded_base(windows, tmp_path):
    """`export --format lora`: base/ holds the rounded model without its corrections and
    adapter/ the corrections as LoRA (alpha = r, so PEFT's scale is 1); peft puts them
    together into what the output computes. The dense export merges corrections too.
    (The base is read by rankwise here: transformers 5.25 dequantizing on load applies one
    scheme to every layer of a mixed-precision checkpoint; run compressed, it loads.)"""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from rankwise.entrypoints.export import ExportConfig, export
    model, _ = bits_model(windows, forms=["corrected"])
    assert any(isinstance(m, CorrectedLinear) for m in model.modules())
    folder = save(model, tmp_path / "q", storage=torch.bfloat16)
    lora = export(ExportConfig(model=str(folder), out=str(tmp_path / "lora"), format="lora"))
    dense = export(ExportConfig(model=str(folder), out=str(tmp_path / "dense")))
    adapter = json.loads((lora / "adapter" / "adapter_config.json").read_text())
    corrected = {n: m.rank for n, m in model.named_modules() if isinstance(m, CorrectedLinear)}
    assert adapter["rank_pattern"] == adapter["alpha_pattern"] == corrected
    base = load(lora / "base")
    assert not any(isinstance(m, CorrectedLinear) for m in base.modules())
    with_adapter = peft.PeftModel.from_pretrained(base, str(lora / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        mine = load(folder)(windows).logits
        assert (with_adapter(input_ids=windows).logits - mine).abs().max() < 1e-4
        assert (merged(input_ids=windows).logits - mine).abs().max() < 1e-3


def test_an_output_without_corrections_has_no_lora_to_export(tmp_path, windows):
    from rankwise.entrypoints.export import ExportConfig, export
    model = structured_tiny("llama", **WIDE)
    compress_(model, CompressConfig(ratio=0.3, cut="oneshot"), windows, progress=False)
    folder = save(model, tmp_path / "lowrank")
    with pytest.raises(RankwiseError, match="no rounded layer with a low-rank correction"):
        export(ExportConfig(model=str(folder), out=str(tmp_path / "lora"), format="lora"))


def test_a_truncation_priced_on_held_out_tokens_costs_what_it_costs_out_of_sample():
    """Tokens drawn from a known input covariance: a truncation's own spectrum prices it on
    the tokens that chose which directions to drop and undercounts what it costs on the
    population (about 0.6 of it here); fitted on half the tokens and priced on the other
    half, its price is the population's, up to sampling noise."""
    from rankwise import geometry
    g = torch.Generator().manual_seed(0)
    m, n, T, r = 48, 64, 96, 16
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Sigma = Q @ torch.diag(torch.logspace(0, -3, n, dtype=torch.float64)) @ Q.T
    W = torch.randn(m, n, generator=g, dtype=torch.float64)

    def draw():
        X = torch.randn(T, n, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(Sigma).T
        Y = torch.randn(T, m, generator=g, dtype=torch.float64)       # gradients: G = T I
        return Y.T @ Y, X.T @ X

    def population(G, C):          # the price of the rank-r cut, in the units of 2T tokens
        B, A = geometry.decompose(W, left=G, right=C, damping=1e-6).factors(r)
        E = W - B @ A
        return (2 * T) ** 2 * float(torch.trace(E @ Sigma @ E.T))

    (Gf, Cf), (Gh, Ch) = draw(), draw()
    setting = Pricing.of(["lowrank"], [8], 32, "rtn", torch.float16, 1e-6)
    held = price(W, Gf, Cf, None, HeldOut(Gh, Ch, 4.0), setting).measured["lowrank"][0]
    inside = price(W, Gf + Gh, Cf + Ch, None, None, setting).measured["lowrank"][0]
    out_of_sample = float(held[r:].sum()) / population(Gf, Cf)
    in_sample = float(inside[r:].sum()) / population(Gf + Gh, Cf + Ch)
    assert in_sample < 0.75
    assert 0.8 < out_of_sample < 1.25
