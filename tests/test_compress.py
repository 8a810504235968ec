import copy

import pytest
import torch
from conftest import FAMILIES, structured_tiny

from rankwise import CompressConfig, RankwiseError, compress_, evaluate, load, save
from rankwise.cut.compress import Execution
from rankwise.evaluation.scoring import parameter_count
from rankwise.forms.allocate import ALLOCATIONS
from rankwise.models.blocks import find_blocks, target_linears
from rankwise.models.layers import ranks_of
from rankwise.statistics.metrics import METRICS


def kl_to_dense(model, dense, windows):
    return evaluate(model, windows, reference=dense, progress=False).kl


def compressed(model, metric, ratio, calib, **kw):
    model = copy.deepcopy(model)
    summary = compress_(model, CompressConfig(metric=metric, ratio=ratio, **kw), calib,
                        progress=False)
    return model, summary


def test_kfac_and_whiten_beat_svd_on_kl_to_dense(tiny, calib, heldout):
    # the same ranks for every metric: this compares the projections, not the allocations
    kl = {metric: kl_to_dense(compressed(tiny, metric, 0.5, calib, allocation="uniform")[0],
                              tiny, heldout)
          for metric in ("svd", "whiten", "kfac")}
    assert kl["kfac"] < kl["svd"] and kl["whiten"] < kl["svd"], kl


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.6, 0.9])
def test_achieved_ratio_matches_request_within_one_rank_step_per_layer(tiny, ratio):
    model, summary = compressed(tiny, "svd", ratio, None)
    shapes = summary.shapes.values()
    step = sum(m + n for m, n in shapes) / sum(m * n for m, n in shapes)
    assert 0 <= summary.achieved_ratio - ratio <= step
    params = sum(p.numel() for name, p in model.named_parameters()
                 if any(name.startswith(layer) for layer in summary.ranks))
    assert params == summary.compressed_params
    assert summary.compressed_params == round((1 - summary.achieved_ratio) * summary.dense_params)


TARGETS = {"llama": 14, "qwen2": 14, "gpt_neox": 8, "phi3": 8, "opt": 12, "gemma": 14, "gpt2": 8}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("metric,allocation", [
    (metric, allocation) for metric in METRICS for allocation in ALLOCATIONS
    if not (allocation == "search" and metric != "kfac")])
def test_metric_allocation_family_matrix(family, metric, allocation, calib, tmp_path):
    model = structured_tiny(family)
    prefix, _ = find_blocks(model)
    layers = target_linears(model)
    assert len(layers) == TARGETS[family]
    assert all(name.startswith(prefix + ".") for name in layers)   # never embeddings / lm_head
    dense_logits = model(calib[:2]).logits
    dense_count = parameter_count(model)
    # the one-shot cut: tests/test_anchored.py takes the anchored one through every family
    config = CompressConfig(metric=metric, ratio=0.4, allocation=allocation, cut="oneshot",
                            search_generations=2, search_offspring=2, search_windows=2)
    summary = compress_(model, config, calib, progress=False)
    step = max(m + n for m, n in summary.shapes.values()) / summary.dense_params
    assert 0.4 <= summary.achieved_ratio <= 0.4 + (len(layers) if allocation == "uniform" else 1) * step
    assert dense_count - parameter_count(model) == summary.dense_params - summary.compressed_params
    assert ranks_of(model) == {k: r for k, r in summary.ranks.items() if r is not None}
    logits = model(calib[:2]).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits)
    if allocation == "spectrum":     # every layout round-trips through a saved folder
        loaded = load(save(model, tmp_path / "out"))
        assert torch.equal(loaded(calib[:2]).logits, logits)


def test_biases_are_kept(calib):
    model = structured_tiny("qwen2")   # q/k/v carry biases
    bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    compress_(model, CompressConfig(metric="whiten", ratio=0.2), calib, progress=False)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.bias.detach(), bias)


def test_include_exclude_and_rank_pattern(tiny, calib):
    model, summary = compressed(tiny, "svd", 0.5, None, include=r"mlp", exclude=r"down_proj",
                                rank_pattern={r"layers\.1\.mlp\.up_proj": 3})
    assert set(summary.ranks) == {f"model.layers.{i}.mlp.{p}_proj"
                                  for i in (0, 1) for p in ("gate", "up")}
    assert summary.ranks["model.layers.1.mlp.up_proj"] == 3
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_no_matching_layers_is_a_clear_error(tiny):
    with pytest.raises(RankwiseError, match="no linear layers match"):
        compress_(tiny, CompressConfig(metric="svd", include="nothing-like-this"), None)


def test_nan_weights_are_refused(tiny, calib):
    with torch.no_grad():
        tiny.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(RankwiseError, match="NaN or Inf"):
        compress_(tiny, CompressConfig(metric="kfac"), calib, progress=False)


@pytest.mark.parametrize("kw,match", [
    ({"ratio": 1.5}, "ratio must be in"), ({"ratio": 0}, "ratio 0 removes nothing"),
    ({"ratio": "a lot"}, "ratio must be a number"), ({"metric": "pca"}, "unknown metric"),
    ({"include": "("}, "invalid regular expression"), ({"damping": -1}, "damping"),
    ({"rank_pattern": {"q_proj": 0}}, "positive integer"),
])
def test_bad_config_is_a_clear_error(kw, match):
    with pytest.raises(RankwiseError, match=match):
        CompressConfig(**kw)


def test_data_driven_metrics_need_calibration(tiny):
    with pytest.raises(RankwiseError, match="needs calibration data"):
        compress_(tiny, CompressConfig(metric="whiten"), None)


def test_shared_inputs_share_one_covariance(tiny, calib):
    from rankwise.statistics import hooks as stats
    layers = target_linears(tiny)
    st = stats.collect(tiny, layers, calib.split(4), progress=False)
    attn = [st[f"model.layers.0.self_attn.{p}_proj"].input_cov for p in "qkv"]
    assert attn[0] is attn[1] is attn[2]
    assert st["model.layers.0.mlp.gate_proj"].input_cov is st["model.layers.0.mlp.up_proj"].input_cov
    x = []
    h = layers["model.layers.0.self_attn.q_proj"].register_forward_pre_hook(
        lambda m, a: x.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for ids in calib.split(4):
            tiny(ids)
    h.remove()
    X = torch.cat(x)
    torch.testing.assert_close(attn[0].double(), X.T @ X, rtol=1e-4, atol=1e-4)


def test_size_accounting(tiny):
    from rankwise.evaluation.scoring import linear_macs
    dense_macs, dense_params = linear_macs(tiny), parameter_count(tiny)
    summary = compress_(tiny, CompressConfig(metric="svd", ratio=0.4), progress=False)
    assert dense_macs - linear_macs(tiny) == summary.dense_params - summary.compressed_params
    assert dense_params - parameter_count(tiny) == summary.dense_params - summary.compressed_params


def test_filter_fn_narrows_the_targets(tiny, calib):
    summary = compress_(tiny, CompressConfig(metric="whiten", ratio=0.3), calib, progress=False,
                        filter_fn=lambda module, name: name.endswith("o_proj"))
    assert set(summary.ranks) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert set(ranks_of(tiny)) == set(summary.ranks)


def test_layers_it_cannot_factor_are_named():
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(8, 8, 3)
            self.norm = nn.LayerNorm(8)

    model = nn.Module()
    model.layers = nn.ModuleList(Block() for _ in range(2))
    with pytest.raises(RankwiseError, match=r"they hold Conv1d \(e.g. layers.0.conv\)"):
        target_linears(model)
    quantized = nn.Linear(8, 8)
    quantized.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    model.layers[0].q = quantized
    with pytest.raises(RankwiseError, match="Linear"):
        target_linears(model)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_walked_statistics_equal_the_whole_models(family, calib):
    """Block by block, each block copied to and from the 'device' (the CPU, with real
    copies as a GPU's moves are), gives the very statistics of one pass through the model."""
    from rankwise.pipeline.distributed import ONE_PROCESS
    from rankwise.pipeline.placement import Placement
    from rankwise.pipeline.spill import Spill
    from rankwise.pipeline.walk import Route, Wants, walk
    from rankwise.statistics import hooks as stats
    model = structured_tiny(family)
    layers = target_linears(model)
    batches = list(calib.split(4))
    for gradients in (None, "full"):
        whole = stats.collect(model, layers, batches, gradients=gradients, seed=3, progress=False)
        with Spill() as spill:
            route = Route(Placement("cpu", copy=True), spill, ONE_PROCESS, progress=False)
            walked = {name: s for block in walk(model, layers, batches, route,
                                                Wants(gradients=gradients, seed=3))
                      for name, s in block.layers.items()}
        assert walked.keys() == whole.keys()
        for name, s in whole.items():
            for kind, value in s.matrices().items():
                other = getattr(walked[name], kind)
                assert (value is None) == (other is None), (name, kind)
                if value is not None:
                    torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-5 * float(value.abs().max()))


@pytest.mark.parametrize("family", ["llama", "opt"])      # OPT's feed-forward flattens tokens
def test_a_walk_holding_windows_out_sums_them_apart_and_the_totals_are_unchanged(family, calib):
    """Every other window held out: the totals over every window are a plain walk's (the
    same sampled labels), and the held-out sums are those of the odd windows alone (input
    sides need no labels, so one pass over those windows gives them)."""
    from rankwise.pipeline.distributed import ONE_PROCESS
    from rankwise.pipeline.placement import Placement
    from rankwise.pipeline.spill import Spill
    from rankwise.pipeline.walk import Route, Wants, walk
    from rankwise.statistics import hooks as stats
    model = structured_tiny(family)
    layers = target_linears(model)
    batches = list(calib.split(3))        # odd windows at either end of a batch
    assert len(batches) >= 3

    def walked(held_out):
        with Spill() as spill:
            route = Route(Placement("cpu"), spill, ONE_PROCESS, progress=False)
            wants = Wants(gradients="full", seed=3, both_sides=True, weighted_inputs=True,
                          held_out=held_out)
            return {name: s for block in walk(model, layers, batches, route, wants)
                    for name, s in block.layers.items()}

    plain, split = walked(False), walked(True)
    odd = stats.collect(model, layers, [calib[1::2]], gradients=None, both_sides=True,
                        progress=False)
    for name, s in split.items():
        assert plain[name].held_out is None and s.held_out is not None
        assert s.held_out.tokens == calib[1::2].numel()
        for kind in ("input_cov", "grad_cov", "weighted_cov"):     # float32 products
            want = getattr(plain[name], kind)
            torch.testing.assert_close(getattr(s, kind), want, rtol=1e-4,
                                       atol=1e-4 * float(want.abs().max()))
        want = odd[name].input_cov
        torch.testing.assert_close(s.held_out.input_cov, want, rtol=1e-4,
                                   atol=1e-4 * float(want.abs().max()))
        for kind in ("grad_cov", "weighted_cov"):     # a part of the whole, not all of it
            part, whole = getattr(s.held_out, kind), getattr(s, kind)
            assert 0 < float(torch.trace(part)) < float(torch.trace(whole))


def test_onloaded_compression_equals_the_resident_ones(calib):
    from rankwise.pipeline.placement import Placement
    dense = structured_tiny("llama")
    config = CompressConfig(metric="kfac", ratio=0.4, allocation="spectrum", steps=2)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    sa = compress_(a, config, calib, progress=False)
    sb = compress_(b, config, calib, progress=False,
                   execution=Execution(placement=Placement("cpu", copy=True)))
    assert sa.ranks == sb.ranks
    with torch.no_grad():
        torch.testing.assert_close(a(calib).logits, b(calib).logits)


@pytest.mark.parametrize("free", [10 ** 9, 1000])
def test_a_model_samples_resident_on_the_device_where_it_fits(calib, free, caplog):
    """--onload: self-sampling runs with the whole model on the device when it fits there
    with its KV cache (the copying placement stands in for a GPU: a visit is a real copy;
    the device's free bytes are given), home again after with nothing copied back; where
    it does not fit, the default mixture drops self with a warning and a chosen one keeps
    it."""
    from rankwise.data.windows import parse_sources
    from rankwise.entrypoints.compress import _sampling_place
    from rankwise.pipeline.placement import Placement
    model = structured_tiny("llama")
    home = {n: p.data_ptr() for n, p in model.named_parameters()}
    placement = Placement("cpu", copy=True, free_bytes=lambda device: free)
    sources = parse_sources(["wikitext", "self"])
    for chosen in (False, True):
        with _sampling_place(model, sources, placement, 32, chosen) as drawn:
            visiting = all(p.data_ptr() != home[n] for n, p in model.named_parameters())
            assert visiting == (free > 10 ** 6)
            names = [s.name for s in drawn]
        assert names == (["wikitext", "self"] if visiting or chosen else ["wikitext"])
        assert {n: p.data_ptr() for n, p in model.named_parameters()} == home
    if free < 10 ** 6:
        assert "calibrating on the texts alone" in caplog.text
