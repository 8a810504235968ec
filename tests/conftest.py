import re
from collections import Counter

import pytest
import torch

from rankwise.data import CALIBRATION_TEXT
from rankwise.models import tiny_model


def word_tokenizer(vocab_size: int = 256):
    """A word-level tokenizer over the shipped calibration text (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = re.findall(r"\w+|[^\w\s]", CALIBRATION_TEXT.read_text()[:200_000])
    vocab = {"[UNK]": 0}
    for w, _ in Counter(words).most_common(vocab_size - 1):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


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
