import copy

import pytest
import torch

from rankwise import CompressConfig, RankwiseError, compress_, evaluate
from rankwise.models import find_blocks
from rankwise.pipeline.walk import block_inputs, run_block

from conftest import FAMILIES, structured_tiny


def compressed(model, calib, **kw):
    model = copy.deepcopy(model)
    summary = compress_(model, CompressConfig(**kw), calib, progress=False)
    return model, summary


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_replayed_from_caught_inputs_match_the_model(family, calib):
    model = structured_tiny(family)
    _, blocks = find_blocks(model)
    seen = []
    handle = blocks[-1].register_forward_hook(
        lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    logits(model, calib)
    handle.remove()
    (args, kwargs), = block_inputs(model, [calib])
    hidden, rest = args[0], (args[1:], kwargs)
    with torch.no_grad():
        for block in blocks[:-1]:
            hidden = run_block(block, hidden, rest)[0]
        assert torch.allclose(run_block(blocks[-1], hidden, rest)[0], seen[0], atol=1e-5)


def test_one_block_model_is_cut_exactly_as_one_shot(calib):
    dense = structured_tiny("llama", num_hidden_layers=1)
    kw = dict(metric="kfac", ratio=0.4, allocation="spectrum")
    one_shot, _ = compressed(dense, calib, **kw)
    seq, _ = compressed(dense, calib, sequential=True, **kw)
    assert torch.equal(logits(one_shot, calib), logits(seq, calib))


def test_later_blocks_are_measured_on_the_outputs_of_cut_blocks(tiny, calib):
    """Sequential = cutting block 0, then measuring and cutting block 1 on that model."""
    # uniform ranks: a per-block allocation by hand could not reproduce a global one
    seq, summary = compressed(tiny, calib, metric="whiten", ratio=0.4, sequential=True,
                              allocation="uniform")
    by_hand = copy.deepcopy(tiny)
    for block in (0, 1):
        compress_(by_hand, CompressConfig(metric="whiten", ratio=0.4, allocation="uniform",
                                          include=rf"layers\.{block}\."), calib, progress=False)
    assert torch.allclose(logits(seq, calib), logits(by_hand, calib), atol=1e-5)
    one_shot, _ = compressed(tiny, calib, metric="whiten", ratio=0.4, allocation="uniform")
    assert not torch.allclose(logits(seq, calib), logits(one_shot, calib), atol=1e-3)


def test_sequential_keeps_the_allocation_and_the_budget(tiny, calib, heldout):
    kw = dict(metric="kfac", ratio=0.4, allocation="spectrum")
    one_shot, a = compressed(tiny, calib, **kw)
    seq, b = compressed(tiny, calib, sequential=True, **kw)
    assert a.ranks == b.ranks and a.achieved_ratio == b.achieved_ratio
    kl = evaluate(seq, heldout, reference=tiny, progress=False).kl
    assert 0 < kl < 10 * evaluate(one_shot, heldout, reference=tiny, progress=False).kl


def test_sequential_with_steps_cuts_further_each_stage(tiny, calib):
    _, summary = compressed(tiny, calib, metric="kfac", ratio=0.5, allocation="spectrum",
                            steps=2, sequential=True)
    assert summary.achieved_ratio == pytest.approx(0.5, abs=0.05)


def test_sequential_needs_a_metric_that_uses_inputs_and_calibration(tiny, calib):
    with pytest.raises(RankwiseError, match="sequential mode re-measures"):
        CompressConfig(metric="svd", sequential=True)
    with pytest.raises(ValueError, match="sequential"):
        compress_(tiny, CompressConfig(metric="kfac", sequential=True), progress=False,
                  precomputed={"x": None})


def test_targets_in_the_first_block_only_are_cut_as_one_shot(tiny, calib):
    kw = dict(metric="kfac", ratio=0.4, include=r"layers\.0\.")
    one_shot, _ = compressed(tiny, calib, **kw)
    seq, _ = compressed(tiny, calib, sequential=True, **kw)
    assert torch.equal(logits(one_shot, calib), logits(seq, calib))


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_keeps_the_ranks_in_every_family(family, calib):
    dense = structured_tiny(family)
    kw = dict(metric="kfac", ratio=0.4, allocation="spectrum")
    _, a = compressed(dense, calib, **kw)
    model, b = compressed(dense, calib, sequential=True, **kw)
    assert a.ranks == b.ranks
    assert torch.isfinite(logits(model, calib)).all()
