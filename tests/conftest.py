import re
from collections import Counter

import pytest
import torch

from rankwise.data.windows import CALIBRATION_TEXT

# the layouts users bring: separate q/k/v and gate/up (llama, gemma), biases on q/k/v
# (qwen2), fused query_key_value (gpt_neox), fused qkv_proj and gate_up_proj (phi3),
# a ReLU MLP with biases under model.decoder.layers (opt), transposed Conv1D layers (gpt2)
FAMILIES = ("llama", "qwen2", "gpt_neox", "phi3", "opt", "gemma", "gpt2")


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """The tests' own cache folder: never the user's."""
    import os
    os.environ["RANKWISE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A small randomly initialised causal LM of one of FAMILIES."""
    import transformers
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    kv = dict(num_key_value_heads=2)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**kv, **common),
        "qwen2": lambda: transformers.Qwen2Config(**kv, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common),
        "phi3": lambda: transformers.Phi3Config(**kv, pad_token_id=0, eos_token_id=1,
                                                bos_token_id=1, **common),
        "opt": lambda: transformers.OPTConfig(
            vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
        "gemma": lambda: transformers.GemmaConfig(**kv, head_dim=16, **common),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                                n_positions=256, bos_token_id=0, eos_token_id=0),
    }
    config = configs[family]()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def word_tokenizer(vocab_size: int = 256, eos: bool = True):
    """A word-level tokenizer over the shipped calibration text (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = re.findall(r"\w+|[^\w\s]", CALIBRATION_TEXT.read_text()[:200_000])
    vocab = {"[UNK]": 0}
    for w, _ in Counter(words).most_common(vocab_size - 1):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                   **({"eos_token": "[UNK]"} if eos else {}))


def structured_tiny(family: str = "llama", seed: int = 0, **overrides):
    """A tiny random model whose embedding has a decaying spectrum, so activations are
    anisotropic as in trained models and the metric matters."""
    model = tiny_model(family, seed=seed, **overrides)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.mul_(torch.logspace(0.5, -1.5, emb.shape[1]))
    return model


@pytest.fixture
def tiny():
    return structured_tiny("llama")


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 32), generator=g)


@pytest.fixture
def heldout():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (8, 32), generator=g)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A Hugging Face model folder (config, weights, tokenizer) of a tiny llama."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    structured_tiny("llama").save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
