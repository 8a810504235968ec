import pytest
import torch
from conftest import word_tokenizer

from rankwise import RankwiseError
from rankwise.data.windows import (DOMAINS, Draw, evaluation_texts, mixture_windows,
                                   parse_sources, sampled_windows, split_counts, tokenize)


def test_every_shipped_domain_has_disjoint_calibration_and_evaluation_parts():
    for name, (calib, evaluation) in DOMAINS.items():
        a, b = calib.read_text(), evaluation.read_text()
        assert len(a) > 100_000 and len(b) > 60_000, name
        # no paragraph of the evaluation part appears in the calibration part
        paragraphs = [p for p in b.split("\n\n") if len(p) > 400][:50]
        assert paragraphs and not any(p in a for p in paragraphs), name


def test_sources_parse_weights_and_fail_before_any_model(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("some words " * 100)
    sources = parse_sources(["wikitext:3", str(text), "self:0.5"])
    assert [s.name for s in sources] == ["wikitext", str(text), "self"]
    assert [s.weight for s in sources] == pytest.approx([3 / 4.5, 1 / 4.5, 0.5 / 4.5])
    assert sources[2].is_self and sources[0].text == DOMAINS["wikitext"][0].read_text()
    with pytest.raises(RankwiseError, match="text file not found: nowhere.txt"):
        parse_sources(["nowhere.txt"])
    with pytest.raises(RankwiseError, match="weight must be positive"):
        parse_sources(["pydoc:0"])
    assert set(evaluation_texts(None)) == set(DOMAINS)


@pytest.mark.parametrize("weights,total", [([0.5, 0.5], 32), ([0.7, 0.2, 0.1], 10),
                                           ([0.98, 0.01, 0.01], 5), ([1 / 3] * 3, 32)])
def test_split_counts_add_up_and_give_every_source_a_window(weights, total):
    counts = split_counts(weights, total)
    assert sum(counts) == total and min(counts) >= 1
    if min(weights) * total >= 1:       # then largest remainders are within one window
        assert all(abs(c - w * total) < 1 for c, w in zip(counts, weights))


def test_a_mixture_draws_each_source_by_weight(tmp_path):
    tok = word_tokenizer()
    sources = parse_sources(["wikitext:3", "pydoc:1"])
    windows, record = mixture_windows(sources, tok, None, Draw(8, 16, seed=2))
    assert windows.shape == (8, 16)
    assert [(r["source"], r["windows"]) for r in record] == [("wikitext", 6), ("pydoc", 2)]
    again, _ = mixture_windows(sources, tok, None, Draw(8, 16, seed=2))
    assert torch.equal(windows, again)
    wiki = tokenize(tok, sources[0].text)
    starts = [any(torch.equal(w, wiki[s:s + 16]) for s in range(0, wiki.numel() - 15))
              for w in windows[:1]]
    assert all(starts)


def test_self_windows_are_the_models_own_samples(tiny):
    a = sampled_windows(tiny, 3, 12, seed=1, batch_size=2, start=5, progress=False)
    b = sampled_windows(tiny, 3, 12, seed=1, batch_size=2, start=5, progress=False)
    assert a.shape == (3, 12) and torch.equal(a, b)
    # a tiny nucleus is greedy decoding
    greedy = sampled_windows(tiny, 1, 6, seed=3, top_p=1e-6, start=5, progress=False)
    ids = torch.tensor([[5]])
    with torch.no_grad():
        for t in range(6):
            nxt = tiny(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(greedy, ids[:, 1:])


def test_the_start_token_lies_inside_the_vocabulary():
    from conftest import tiny_model

    from rankwise.data.windows import start_token
    assert start_token(tiny_model("llama")) == 1                       # its BOS
    outside = tiny_model("gpt2", bos_token_id=50256, eos_token_id=50256)
    assert start_token(outside) is None
    with pytest.raises(RankwiseError, match="needs a start token inside the vocabulary of 256"):
        sampled_windows(outside, 1, 4, progress=False)


def test_sampled_windows_are_cached_by_the_models_content(tiny, tmp_path):
    from rankwise.data.windows import SELF, Source
    from rankwise.formats.cache import Cache
    sources = [Source(SELF, 1.0)]
    cache = Cache(root=tmp_path)
    first, _ = mixture_windows(sources, None, tiny, Draw(2, 8, seed=1), cache=cache, model_key="a")
    assert cache.record["sampled-windows"] == "miss"
    again, _ = mixture_windows(sources, None, tiny, Draw(2, 8, seed=1), cache=cache, model_key="a")
    assert cache.record["sampled-windows"] == "hit" and torch.equal(first, again)
    mixture_windows(sources, None, tiny, Draw(2, 8, seed=1), cache=cache, model_key="b")
    assert cache.record["sampled-windows"] == "miss"                  # another model
    entry = next(p for p in (tmp_path / "sampled-windows").iterdir()
                 if (p / "entry.json").read_text().count('"a"'))
    data = bytearray((entry / "windows.safetensors").read_bytes())
    data[-1] ^= 0xFF                                                   # one flipped bit
    (entry / "windows.safetensors").write_bytes(bytes(data))
    recomputed, _ = mixture_windows(sources, None, tiny, Draw(2, 8, seed=1), cache=cache, model_key="a")
    assert cache.record["sampled-windows"] == "miss" and torch.equal(recomputed, first)
    off = Cache(enabled=False, root=tmp_path)
    mixture_windows(sources, None, tiny, Draw(2, 8, seed=1), cache=off, model_key="a")
    assert off.record["sampled-windows"] == "off"


def test_a_folders_digest_follows_its_content(tmp_path):
    from rankwise.formats.cache import Cache
    cache = Cache(root=tmp_path / "cache")
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights").write_bytes(b"abc")
    first = cache.digest(model)
    assert cache.digest(model) == first
    (model / "weights").write_bytes(b"abd")
    assert cache.digest(model) != first


def test_a_cache_entry_holding_what_this_code_does_not_read_is_computed_again(tiny, tmp_path):
    """Intact files of the wrong content (windows of another shape, an entry record naming
    a file outside its folder) are recomputed, never a TypeError and never trusted."""
    import json

    from safetensors.torch import save_file

    from rankwise.data.windows import SELF, Source
    from rankwise.formats.cache import Cache, file_digest
    sources, cache = [Source(SELF, 1.0)], Cache(root=tmp_path / "cache")
    first, _ = mixture_windows(sources, None, tiny, Draw(2, 8, seed=1), cache=cache, model_key="a")
    entry = next((tmp_path / "cache" / "sampled-windows").iterdir())
    save_file({"windows": torch.zeros(3, 5)}, str(entry / "windows.safetensors"))    # wrong
    record = json.loads((entry / "entry.json").read_text())
    record["files"] = {"windows.safetensors": file_digest(entry / "windows.safetensors")}
    (entry / "entry.json").write_text(json.dumps(record))
    again, _ = mixture_windows(sources, None, tiny, Draw(2, 8, seed=1), cache=cache, model_key="a")
    assert torch.equal(again, first)
    (tmp_path / "secret").write_bytes(b"x")
    record = json.loads((entry / "entry.json").read_text())
    record["files"] = {"../../secret": file_digest(tmp_path / "secret")}
    (entry / "entry.json").write_text(json.dumps(record))
    assert cache.get("sampled-windows", record["key"]) is None and not entry.exists()


def test_the_cache_folder_is_private_and_one_others_can_write_is_not_used(tmp_path, caplog):
    import os
    import stat

    from rankwise.formats.cache import Cache
    cache = Cache(root=tmp_path / "fresh")
    assert cache.enabled and stat.S_IMODE(os.stat(tmp_path / "fresh").st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert not Cache(root=shared).enabled
    assert "can be written by other users" in caplog.text
