import copy
import math
import time

import pytest
import torch

from rankwise import evaluate, measure_speed
from rankwise.data.windows import CALIBRATION_TEXT


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



def test_a_second_evaluation_reads_the_dense_reference_and_the_scores_from_the_cache(
        tiny_folder, tmp_path, monkeypatch):
    """The first run against a reference records its head inputs; another model scored
    against it runs the reference only through its head, to the same numbers bit for bit;
    scoring the same model again reads its report (an output's eval.json aside, nothing it
    computes from changed)."""
    from conftest import structured_tiny, word_tokenizer

    import rankwise.entrypoints.evaluate as entry
    from rankwise.formats.cache import Cache
    text = tmp_path / "text.txt"
    text.write_text(CALIBRATION_TEXT.read_text()[:20_000])
    other = tmp_path / "other"
    structured_tiny("llama", seed=3).save_pretrained(other)
    word_tokenizer().save_pretrained(other)

    def scored(model):
        config = entry.EvalConfig(model=str(model), reference=str(tiny_folder),
                                  text=[str(text)], windows=3, seqlen=32, batch_size=2)
        return entry.evaluate_model(config, progress=False).reports[str(text)]
    itself = scored(tiny_folder)
    assert itself.kl == 0 and itself.top1_agreement == 1
    assert any(Cache().root.glob("reference/*/head_inputs.safetensors"))
    afresh = evaluate(structured_tiny("llama", seed=3), *_windows_of(text, tiny_folder),
                      reference=structured_tiny("llama"), batch_size=2, progress=False)
    references = []

    def recording(model, windows, reference, *args):
        references.append(type(reference).__name__)
        return evaluate(model, windows, reference, *args)
    monkeypatch.setattr(entry, "evaluate", recording)
    first = scored(other)
    assert references == ["HeadInputs"] and first == afresh
    assert scored(other) == first and references == ["HeadInputs"]


def _windows_of(text, folder):
    from transformers import AutoTokenizer

    from rankwise.data.windows import evaluation_windows, tokenize
    tokens = tokenize(AutoTokenizer.from_pretrained(folder), text.read_text())
    return (evaluation_windows(tokens, 32, 3, what="text"),)


def test_a_model_that_changes_its_logits_after_its_head_is_not_held_by_its_head_inputs(
        tiny, heldout):
    from rankwise.evaluation.scoring import head_inputs_of, head_reproduces
    with head_inputs_of(tiny) as collected:
        evaluate(tiny, heldout[:2], progress=False)
    inputs = torch.cat(collected)
    assert inputs.shape == (2, heldout.shape[1], tiny.config.hidden_size)
    assert head_reproduces(tiny, heldout, inputs)
    forward = tiny.forward

    def softcapped(*args, **kwargs):             # as Gemma 2 does after its head
        out = forward(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out
    tiny.forward = softcapped
    assert not head_reproduces(tiny, heldout, inputs)


def test_evaluation_runs_batch_size_windows_per_forward(tiny):
    """--batch-size is honoured: ceil(N / b) forwards, the same numbers as one at a time."""
    windows = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(tiny)
    with torch.no_grad():
        reference.lm_head.weight.mul_(1.1)
    calls, forward = [], tiny.forward

    def counted(*args, **kwargs):
        calls.append(kwargs.get("input_ids", args[0] if args else None).shape[0])
        return forward(*args, **kwargs)
    tiny.forward = counted
    one = evaluate(tiny, windows, reference, batch_size=1, progress=False)
    calls.clear()
    three = evaluate(tiny, windows, reference, batch_size=3, progress=False)
    assert calls == [3, 2]
    for key in ("perplexity", "reference_perplexity", "kl", "top1_agreement"):
        assert getattr(three, key) == pytest.approx(getattr(one, key), rel=1e-5)
