"""The statistics the hooks accumulate equal what autograd gives, layer by layer."""
import pytest
import torch

from rankwise.models.blocks import target_linears
from rankwise.statistics import hooks as stats


def by_hand(model, layers, batches, seed):
    """Inputs, outputs and output gradients of every layer from autograd directly, with the
    labels drawn as stats.collect draws them (same generator, same order)."""
    seen = {name: {"x": [], "y": []} for name in layers}
    handles = []
    for name, layer in layers.items():
        def hook(module, args, out, name=name):
            out.retain_grad()
            seen[name]["x"].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
            seen[name]["y"].append(out)
        handles.append(layer.register_forward_hook(hook))
    generator = torch.Generator().manual_seed(seed)
    for ids in batches:
        logits = model(input_ids=ids, use_cache=False).logits
        logits.backward(stats.sample_logit_gradient(logits, generator))
    for h in handles:
        h.remove()
    out = {}
    for name, layer in layers.items():
        W = layer.weight.detach().double()
        x = torch.cat(seen[name]["x"])
        y = torch.cat([y.detach().reshape(-1, y.shape[-1]) for y in seen[name]["y"]]).double()
        g = torch.cat([y.grad.reshape(-1, y.shape[-1]) for y in seen[name]["y"]]).double()
        b = layer.bias.detach().double() if layer.bias is not None else 0
        out[name] = {"input_cov": x.T @ x, "output_cov": (y - b).T @ (y - b), "grad_cov": g.T @ g,
                     "input_grad_cov": (g @ W).T @ (g @ W), "grad_diag": g.square().sum(0)}
    return out


@pytest.mark.parametrize("family,totals", [("llama", torch.float64), ("qwen2", torch.float64),
                                           ("llama", torch.float32)])
def test_every_statistic_equals_autograd(family, totals, calib, monkeypatch):
    """float32 totals: the route an accelerator takes (one addmm_ per product), on the CPU."""
    from functools import partialmethod

    from conftest import structured_tiny
    monkeypatch.setattr(stats.Sums, "__init__", partialmethod(stats.Sums.__init__, totals))
    model = structured_tiny(family)
    layers = target_linears(model)
    batches = list(calib.split(4))
    collected = stats.collect(model, layers, batches, inputs=True, gradients="full", seed=3,
                              progress=False)
    expected = by_hand(model, layers, batches, seed=3)
    kinds_seen = set()
    for name, s in collected.items():
        assert s.tokens == calib.numel()
        for kind, value in s.matrices().items():
            if value is None:
                continue
            kinds_seen.add(kind)
            assert value.dtype == totals
            want = expected[name][kind]
            torch.testing.assert_close(value.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
        m, n = layers[name].out_features, layers[name].in_features
        # the smaller side is what the projection needs, so it must be there
        assert (s.grad_cov is not None) if m <= n else (s.input_grad_cov is not None)
    assert kinds_seen == {"input_cov", "output_cov", "grad_cov", "input_grad_cov", "grad_diag"}


def test_sums_take_float64_on_the_cpu_and_float32_on_an_accelerator():
    """Chosen from the first tensor's device; the meta device stands in for a GPU."""
    cpu, elsewhere = stats.Sums(), stats.Sums()
    cpu.gram("c", torch.ones(5, 3))
    elsewhere.gram("c", torch.ones(5, 3, device="meta"))
    elsewhere.gram("c", torch.ones(5, 3, device="meta"))
    assert cpu.totals["c"].dtype == torch.float64
    assert elsewhere.totals["c"].dtype == torch.float32 and elsewhere.totals["c"].shape == (3, 3)


def test_both_sides_holds_C_and_G_for_every_layer(tiny, calib):
    layers = target_linears(tiny)
    batches = list(calib.split(4))
    collected = stats.collect(tiny, layers, batches, gradients="full", both_sides=True, seed=1,
                              progress=False)
    expected = by_hand(tiny, layers, batches, seed=1)
    for name, s in collected.items():
        for kind in ("input_cov", "grad_cov"):
            want = expected[name][kind]
            torch.testing.assert_close(getattr(s, kind).double(), want, rtol=1e-4,
                                       atol=1e-4 * float(want.abs().max()))


def test_diagonal_fisher_alone(tiny, calib):
    layers = target_linears(tiny)
    batches = list(calib.split(4))
    collected = stats.collect(tiny, layers, batches, inputs=False, gradients="diag", seed=2,
                              progress=False)
    expected = by_hand(tiny, layers, batches, seed=2)
    for name, s in collected.items():
        assert s.grad_cov is None and s.input_cov is None
        torch.testing.assert_close(s.grad_diag.double(), expected[name]["grad_diag"], rtol=1e-4, atol=1e-6)


def test_sampled_logit_gradient_is_softmax_minus_a_one_hot_sample():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    grad = stats.sample_logit_gradient(logits, torch.Generator().manual_seed(4))
    onehot = torch.softmax(logits, -1) - grad
    assert torch.allclose(onehot.sum(-1), torch.ones(3, 5), atol=1e-6)
    assert ((onehot.abs() < 1e-6) | ((onehot - 1).abs() < 1e-6)).all()
    # labels follow the model's own distribution: over many draws, their frequencies do
    many = logits[:1, :1].expand(20000, 1, 11)
    freq = (torch.softmax(many, -1) - stats.sample_logit_gradient(
        many, torch.Generator().manual_seed(5))).mean((0, 1))
    torch.testing.assert_close(freq, torch.softmax(logits[0, 0], -1), atol=0.015, rtol=0)


def test_tf32_switch_uses_the_precision_api_and_restores_it():
    """The GPU route of the statistics products, run on the CPU against a stand-in for
    torch.backends.cuda.matmul: the new fp32_precision API when present (torch refuses to
    mix it with allow_tf32), the legacy flag otherwise; restored after, even on error."""
    from types import SimpleNamespace

    from rankwise.statistics.hooks import tf32_matmuls
    new, old = SimpleNamespace(fp32_precision="ieee"), SimpleNamespace(allow_tf32=False)
    with tf32_matmuls(True, new), tf32_matmuls(True, old):
        assert new.fp32_precision == "tf32" and old.allow_tf32 is True
    assert new.fp32_precision == "ieee" and old.allow_tf32 is False
    with pytest.raises(ValueError), tf32_matmuls(True, new):
        raise ValueError
    assert new.fp32_precision == "ieee"
    with tf32_matmuls(False, new):
        assert new.fp32_precision == "ieee"
