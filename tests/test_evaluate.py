import math
import time

import pytest
import torch
from rankwise import evaluate, measure_speed


def test_speed_is_tokens_over_the_time_generate_takes(tiny):
    """A model slowed by a known delay per forward call: one call per generated token."""
    delay, forward = 0.05, tiny.forward

    def slow(*args, **kwargs):
        time.sleep(delay)
        return forward(*args, **kwargs)
    tiny.forward = slow
    speed = measure_speed(tiny, prompt_len=16, decode_tokens=4, repeats=2, batch_size=2)
    assert 2 * 16 / delay / 1.5 < speed.prefill_tokens_per_s < 2 * 16 / delay
    assert 2 / delay / 1.5 < speed.decode_tokens_per_s < 2 / delay * 1.1


def test_the_fast_path_generates_what_eager_generates(tiny):
    import copy

    from rankwise import accelerate
    ids = torch.randint(0, 256, (1, 12))
    eager = tiny.generate(ids, max_new_tokens=6, do_sample=False)
    fast = accelerate(copy.deepcopy(tiny), compile=False)
    assert fast.generation_config.cache_implementation == "static"
    assert torch.equal(fast.generate(ids, max_new_tokens=6, do_sample=False), eager)
    assert not hasattr(fast, "_compiled_call")


def test_compiled_decoding_of_a_factored_model_generates_what_eager_generates(tiny):
    """The route a GPU takes: transformers compiles the decoding step itself (CUDA graphs
    with "reduce-overhead" there); the forward is not wrapped a second time."""
    import copy

    from rankwise import CompressConfig, accelerate, compress_
    factored = copy.deepcopy(tiny)
    compress_(factored, CompressConfig(metric="svd", ratio=0.4, allocation="uniform"),
              progress=False)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = factored.generate(ids, max_new_tokens=6, do_sample=False)
        fast = accelerate(factored, mode="reduce-overhead")
        assert fast.forward.__func__ is type(fast).forward     # not wrapped
        assert torch.equal(fast.generate(ids, max_new_tokens=6, do_sample=False), eager)
    assert hasattr(fast, "_compiled_call")                     # transformers compiled the steps


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
