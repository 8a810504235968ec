import math
import time

import pytest
import torch
from torch import nn

from rankwise import evaluate, measure_speed


class Slow(nn.Module):
    """A model that takes a known extra time per forward call."""

    def __init__(self, model, seconds):
        super().__init__()
        self.model, self.seconds, self.config = model, seconds, model.config

    def forward(self, **kw):
        time.sleep(self.seconds)
        return self.model(**kw)


def test_speed_is_tokens_over_the_measured_time(tiny):
    delay = 0.05
    speed = measure_speed(Slow(tiny, delay), prompt_len=16, decode_tokens=4, repeats=2)
    assert 16 / delay / 1.5 < speed.prefill_tokens_per_s < 16 / delay
    assert 1 / delay / 1.5 < speed.decode_tokens_per_s < 1 / delay


def test_perplexity_kl_and_agreement_by_hand(tiny, heldout):
    from conftest import structured_tiny
    other = structured_tiny("llama", seed=5)
    report = evaluate(other, heldout, reference=tiny, batch_size=3, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(other(heldout).logits[:, :-1].double(), -1)
        ref = torch.log_softmax(tiny(heldout).logits[:, :-1].double(), -1)
    targets = heldout[:, 1:]
    nll = -logp.gather(-1, targets[..., None]).mean()
    assert report.tokens == targets.numel()
    assert report.perplexity == pytest.approx(math.exp(nll), rel=1e-4)
    assert report.kl == pytest.approx(float((ref.exp() * (ref - logp)).sum(-1).mean()), rel=1e-3)
    assert report.top1_agreement == pytest.approx(
        float((ref.argmax(-1) == logp.argmax(-1)).double().mean()))
    assert evaluate(tiny, heldout, reference=tiny, progress=False).kl == pytest.approx(0, abs=1e-6)
