"""Text sources -> token windows: shipped domains, files, weighted mixtures, and text
sampled from the model itself.

Three domains ship inside the package, each split into a calibration part and an
evaluation part that share no document: WikiText-2 (validation / test), the Python
standard library's documentation topics (pydoc) and standard library source (code); see
scripts/make_domain_texts.py. A calibration source is a shipped domain's calibration part,
any text file, or `self`: windows sampled from the dense model (data-free calibration).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RankwiseError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "texts"
DOMAINS = {   # name: (calibration part, evaluation part)
    "wikitext": (DATA_DIR / "valid.tokens.txt", DATA_DIR / "wiki.test.raw"),
    "pydoc": (DATA_DIR / "pydoc.calib.txt", DATA_DIR / "pydoc.eval.txt"),
    "code": (DATA_DIR / "code.calib.txt", DATA_DIR / "code.eval.txt"),
}
CALIBRATION_TEXT, EVALUATION_TEXT = DOMAINS["wikitext"]
SELF = "self"


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RankwiseError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise RankwiseError(f"expected a text file, got a folder: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RankwiseError(f"cannot read text file {path}: {e}") from None
    if not text.strip():
        raise RankwiseError(f"text file {path} is empty")
    return text


@dataclass
class Source:
    """One part of a calibration mixture: a text (shipped domain or file) or `self`."""
    name: str
    weight: float
    text: str | None = None      # None for self

    @property
    def is_self(self) -> bool:
        return self.text is None


def parse_sources(specs: list[str]) -> list[Source]:
    """Calibration sources from specs NAME[:WEIGHT] (a shipped domain, a text file or
    `self`; weight 1 by default), texts read now so that a bad one fails before any model
    is loaded; weights normalised to sum 1."""
    if not specs:
        raise RankwiseError("give at least one calibration source")
    sources = []
    for spec in specs:
        name, sep, weight = str(spec).rpartition(":")
        if not sep or not _is_number(weight):
            name, weight = str(spec), "1"
        if float(weight) <= 0:
            raise RankwiseError(f"calibration weight must be positive, got {spec!r}")
        if name != SELF and name not in DOMAINS and not Path(name).exists():
            raise RankwiseError(f"text file not found: {name} (a calibration source is a text "
                                f"file, a shipped domain ({', '.join(DOMAINS)}) or {SELF})")
        text = None if name == SELF else \
            read_text(DOMAINS[name][0] if name in DOMAINS else name)
        sources.append(Source(name, float(weight), text))
    total = sum(s.weight for s in sources)
    for s in sources:
        s.weight /= total
    return sources


def evaluation_texts(specs: list[str] | None) -> dict[str, str]:
    """{name: text} of the evaluation parts of shipped domains or of text files (None:
    every shipped domain)."""
    specs = list(DOMAINS) if not specs else specs
    return {name: read_text(DOMAINS[name][1] if name in DOMAINS else name) for name in specs}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_counts(weights: list[float], total: int) -> list[int]:
    """`total` windows split by weight (largest remainders), every source at least one."""
    if total < len(weights):
        raise RankwiseError(f"{total} calibration windows cannot cover {len(weights)} sources")
    exact = [w * total for w in weights]
    counts = [max(1, int(e)) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in order[:max(total - sum(counts), 0)]:
        counts[i] += 1
    while sum(counts) > total:        # the minimum of one overshot: take from the largest
        counts[counts.index(max(counts))] -= 1
    return counts


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_length(ids: torch.Tensor, seqlen: int, what: str) -> int:
    if seqlen < 2:
        raise RankwiseError(f"window length must be at least 2 tokens, got {seqlen}")
    available = ids.numel() // seqlen
    if available < 1:
        raise RankwiseError(f"{what} has {ids.numel()} tokens, shorter than one window of "
                            f"{seqlen}; give a longer text or a shorter --seqlen")
    return available


def calibration_windows(ids: torch.Tensor, count: int, seqlen: int, seed: int = 0,
                        what: str = "the calibration text") -> torch.Tensor:
    """`count` windows of `seqlen` tokens at random positions (seeded), as (count, seqlen)."""
    if count < 1:
        raise RankwiseError(f"the number of calibration windows must be at least 1, got {count}")
    _check_length(ids, seqlen, what)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (count,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, count: int | None = None,
                       what: str = "the evaluation text") -> torch.Tensor:
    """Consecutive non-overlapping windows from the start; count=None takes them all."""
    available = _check_length(ids, seqlen, what)
    if count is not None:
        if count < 1:
            raise RankwiseError(f"the number of evaluation windows must be at least 1, got {count}")
        available = min(available, count)
    return ids[:available * seqlen].view(available, seqlen)


def without_self_if_unsampleable(sources: list[Source], model, tokenizer) -> list[Source]:
    """The default mixture for a model that self-sampling cannot start (no BOS or EOS
    token inside its vocabulary): the texts alone, with a warning."""
    if not any(s.is_self for s in sources) or start_token(model, tokenizer) is not None:
        return sources
    log.warning("the model has no BOS or EOS token inside its vocabulary to start "
                "self-sampled calibration from; calibrating on the texts alone")
    return without_self(sources)


def without_self(sources: list[Source]) -> list[Source]:
    """The text sources of a mixture, their weights renormalised."""
    kept = [s for s in sources if not s.is_self]
    total = sum(s.weight for s in kept)
    return [Source(s.name, s.weight / total, s.text) for s in kept]


@dataclass(frozen=True)
class Draw:
    """Which windows a mixture gives: how many, how long, from which seed, and how the
    model samples its own (`self`) windows."""
    count: int
    seqlen: int
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95


def mixture_windows(sources: list[Source], tokenizer, model, draw: Draw, progress: bool = True,
                    cache=None, model_key: str | None = None) -> tuple[torch.Tensor, list[dict]]:
    """`draw.count` calibration windows split over the sources by weight (source i drawn
    with seed + i), and a record of what each source gave, for the manifest. With a `cache`
    (rankwise.formats.cache.Cache) and the model's content digest `model_key`, sampled windows are
    kept and reused."""
    count, seqlen, seed = draw.count, draw.seqlen, draw.seed
    temperature, top_p = draw.temperature, draw.top_p
    parts, record = [], []
    for i, (source, n) in enumerate(zip(sources, split_counts([s.weight for s in sources], count))):
        if source.is_self:
            args = dict(count=n, seqlen=seqlen, seed=seed + i, temperature=temperature,
                        top_p=top_p, start=start_token(model, tokenizer))
            windows = _cached_samples(model, args, cache, model_key, progress)
            record.append({"source": SELF, "windows": n, "temperature": temperature,
                           "top_p": top_p, "seed": seed + i})
        else:
            windows = calibration_windows(tokenize(tokenizer, source.text), n, seqlen, seed + i,
                                          what=f"calibration source {source.name}")
            record.append({"source": source.name, "windows": n, "seed": seed + i})
        parts.append(windows)
    return torch.cat(parts), record


def _cached_samples(model, args: dict, cache, model_key: str | None, progress: bool):
    """sampled_windows(model, **args), through the cache when there is a key."""
    from safetensors.torch import load_file, save_file
    key = {"model": model_key, "sampler": SAMPLER, **args} if model_key else None
    entry = cache.get("sampled-windows", key) if cache is not None and key else None
    kept = None if entry is None else cache.usable(
        lambda: _windows_of(load_file(str(entry / "windows.safetensors"))["windows"], args))
    if kept is not None:
        return kept
    windows = sampled_windows(model, progress=progress, **args)
    if cache is not None and key:
        cache.put("sampled-windows", key,
                  lambda tmp: save_file({"windows": windows}, str(tmp / "windows.safetensors")))
    return windows


def _windows_of(windows: torch.Tensor, args: dict) -> torch.Tensor:
    """Sampled windows as kept in the cache, checked to be what was asked for."""
    if windows.dtype != torch.long or tuple(windows.shape) != (args["count"], args["seqlen"]):
        raise ValueError(f"windows of {tuple(windows.shape)} {windows.dtype}")
    return windows


def start_token(model, tokenizer=None) -> int | None:
    """The token self-sampling starts from: the first of the model's (or its tokenizer's)
    BOS and EOS tokens that lies inside its vocabulary; None when there is none."""
    vocab = model.get_input_embeddings().num_embeddings
    candidates = []
    for owner in (model.config, getattr(model, "generation_config", None), tokenizer):
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(owner, name, None)
            candidates += value if isinstance(value, (list, tuple)) else [value]
    return next((t for t in candidates if isinstance(t, int) and 0 <= t < vocab), None)


SAMPLER = 1          # the sampler's version, part of the cache key of its windows


SAMPLING_BATCH = 8          # windows decoded together by self-sampling


def sampling_bytes(model, seqlen: int, batch_size: int = SAMPLING_BATCH) -> int:
    """What self-sampling holds besides the weights: the KV cache of `batch_size` windows
    of seqlen + 1 tokens (keys and values of every layer, in the weights' dtype) and a
    step's float32 logits and probabilities."""
    c = model.config
    heads = getattr(c, "num_attention_heads", 1)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    element = next(model.parameters()).element_size()
    cache = 2 * c.num_hidden_layers * batch_size * (seqlen + 1) * kv_heads * head_dim * element
    return cache + 2 * batch_size * c.vocab_size * 4


@torch.no_grad()
def sampled_windows(model, count: int, seqlen: int, seed: int = 0, temperature: float = 1.0,
                    top_p: float = 0.95, batch_size: int = SAMPLING_BATCH, start: int | None = None,
                    progress: bool = True) -> torch.Tensor:
    """`count` windows of `seqlen` tokens sampled from the model itself (`generate` with
    nucleus sampling at `temperature` and `top_p`, seeded; end-of-sequence suppressed so
    every window is full), each started from the token `start` (default
    start_token(model)), which is not part of the window. `batch_size` windows are
    decoded together, with a KV cache; on a CPU the steps cost what reading the weights
    costs (about 40 ms a step for the 135M model here), so 8 windows of 512 take ~45 s."""
    from tqdm.auto import tqdm

    start = start if start is not None else start_token(model)
    vocab = model.get_input_embeddings().num_embeddings
    if start is None or not 0 <= start < vocab:
        raise RankwiseError(f"self calibration needs a start token inside the vocabulary of "
                            f"{vocab} and the model has none (BOS, EOS: "
                            f"{getattr(model.config, 'bos_token_id', None)}, "
                            f"{getattr(model.config, 'eos_token_id', None)}); calibrate on a "
                            "text instead")
    device = next(model.parameters()).device
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for n in tqdm(range(0, count, batch_size), desc="sampling calibration", unit="batch",
                      disable=not progress):
            prompt = torch.full((min(batch_size, count - n), 1), int(start), device=device)
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=seqlen, min_new_tokens=seqlen,
                                 pad_token_id=int(start))
            out.append(ids[:, 1:].cpu())
    from ..models.host import release_host_memory
    release_host_memory()
    return torch.cat(out)


