"""Sibling fusion: factored layers that read one input run their first factors as one
stacked matmul, without changing what the model computes."""
import copy

import pytest
import torch

from rankwise import CompressConfig, compress_
from rankwise.models.fusion import fuse_causal_lm, fused_groups, unfuse_siblings
from rankwise.models.layers import LowRankLinear


@pytest.fixture
def pair(tiny):
    """(fused, unfused) copies of one factored tiny llama."""
    compress_(tiny, CompressConfig(metric="svd", ratio=0.4, allocation="uniform"), progress=False)
    plain = copy.deepcopy(tiny)
    unfuse_siblings(plain)
    return tiny, plain


def _stacked_calls(model, ids):
    """How many first-factor matmuls one forward runs."""
    import rankwise.models.layers as layers
    calls, linear = [], layers.F.linear

    def counting(x, w, *rest):
        calls.append(w.shape)
        return linear(x, w, *rest)
    layers.F.linear = counting
    try:
        with torch.no_grad():
            model(ids)
    finally:
        layers.F.linear = linear
    return len(calls)


def test_compress_fuses_qkv_and_gate_up_and_logits_do_not_change(pair, heldout):
    fused, plain = pair
    groups = fused_groups(fused)
    assert sorted(sorted(n.rsplit(".", 1)[1] for n in g) for g in groups) == \
        [["gate_proj", "up_proj"]] * 2 + [["k_proj", "q_proj", "v_proj"]] * 2
    for g in groups:                   # every A a slice of its group's one stack
        members = [fused.get_submodule(n) for n in g]
        storages = {m.A.weight.untyped_storage().data_ptr() for m in members}
        assert len(storages) == 1 and members[0]._siblings.stacked.untyped_storage().data_ptr() in storages
    with torch.no_grad():
        torch.testing.assert_close(fused(heldout).logits, plain(heldout).logits, rtol=1e-5, atol=1e-5)
    # per block: 7 layers x 2 matmuls unfused; fused saves 2 (q/k/v) + 1 (gate/up)
    assert _stacked_calls(plain, heldout) - _stacked_calls(fused, heldout) == 2 * 3
    # a decoding step's few rows: every layer's own two matmuls (the same bytes either way)
    one_token = heldout[:2, :1]
    assert _stacked_calls(plain, one_token) == _stacked_calls(fused, one_token)


def test_training_runs_unfused_and_the_fused_path_sees_its_updates(pair, heldout):
    fused, plain = pair
    opt = torch.optim.SGD([p for n, p in fused.named_parameters() if n.endswith(".A.weight")],
                          lr=0.1)
    fused.train()
    loss = fused(heldout, labels=heldout).loss
    loss.backward()
    assert all(m.A.weight.grad is not None for m in fused.modules() if isinstance(m, LowRankLinear))
    opt.step()
    fused.eval()
    reference = copy.deepcopy(fused)
    unfuse_siblings(reference)
    assert not torch.equal(reference.model.layers[0].self_attn.q_proj.A.weight,
                           plain.model.layers[0].self_attn.q_proj.A.weight)
    with torch.inference_mode():
        torch.testing.assert_close(fused(heldout).logits, reference(heldout).logits)


def test_a_move_or_a_copy_restacks_and_the_copy_is_independent(pair, heldout):
    fused, plain = pair
    double = copy.deepcopy(fused).to(torch.float64)
    with torch.no_grad():
        expected = plain.double()(heldout).logits
        torch.testing.assert_close(double(heldout).logits, expected)
        twin = copy.deepcopy(double)
        twin.model.layers[0].mlp.up_proj.A.weight.zero_()
        torch.testing.assert_close(double(heldout).logits, expected)    # the original is intact
        assert not torch.allclose(twin(heldout).logits, expected)


def test_siblings_called_on_different_tensors_compute_each_afresh(pair):
    fused, _ = pair
    attn = fused.model.layers[0].self_attn
    x, y = torch.randn(2, 40, 64), torch.randn(2, 40, 64)     # 80 rows: the fused path
    with torch.no_grad():
        got = [attn.q_proj(x), attn.k_proj(y), attn.v_proj(x), attn.q_proj(x)]
        x.mul_(2)                                   # same tensor, new values: not reused
        got.append(attn.k_proj(x))
    unfuse_siblings(fused)
    with torch.no_grad():
        want = [attn.q_proj(x / 2), attn.k_proj(y), attn.v_proj(x / 2), attn.q_proj(x / 2),
                attn.k_proj(x)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_state_dict_of_a_fused_model_shares_no_memory(pair, tmp_path):
    from safetensors.torch import save_file
    fused, _ = pair
    state = fused.state_dict()
    save_file({k: v for k, v in state.items() if "embed" not in k}, tmp_path / "w.safetensors")
    assert len({v.untyped_storage().data_ptr() for k, v in state.items()
                if k.endswith(".A.weight")}) == \
        sum(1 for m in fused.modules() if isinstance(m, LowRankLinear))


def test_a_model_without_factored_layers_or_embeddings_is_left_alone(tiny):
    assert fuse_causal_lm(tiny) == []
    assert fuse_causal_lm(torch.nn.Sequential(torch.nn.Linear(4, 4))) == []


def test_a_move_restacks_at_once_not_at_the_first_call(pair):
    """What a CUDA graph captured after `.to("cuda")` needs: the stack rebuilt by the move
    itself (a cast takes the same _apply route on the CPU), every A weight a view of it
    before any forward."""
    fused, _ = pair
    fused.to(torch.float64)
    for group in {id(m._siblings): m._siblings for m in fused.modules()
                  if getattr(m, "_siblings", None) is not None}.values():
        assert group.stacked.dtype == torch.float64 and group._stacked_still()
        for member in group.members:
            assert member.A.weight.untyped_storage().data_ptr() == \
                group.stacked.untyped_storage().data_ptr()
