"""Text corpora -> token windows. WikiText-2 ships inside the package so runs work offline."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import RankwiseError

DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_TEXT = DATA_DIR / "valid.tokens.txt"   # WikiText-2 validation split
EVALUATION_TEXT = DATA_DIR / "wiki.test.raw"       # WikiText-2 raw test split


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
