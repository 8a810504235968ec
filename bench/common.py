"""What the quality benches share: the dense model's numbers on every shipped domain, and
one compressed model scored the same way.

WikiText-2 test gets perplexity, KL to dense and top-1 agreement (the dense model's
log-probabilities are kept, 2 GB for 40 x 512 tokens); the off-domain evaluation parts
(pydoc, code) get perplexity and its ratio to dense, which needs no reference tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rankwise import evaluate
from rankwise.data.windows import DOMAINS, evaluation_texts, evaluation_windows, tokenize
from rankwise.evaluation.scoring import reference_log_probs

IN_DOMAIN = "wikitext"


@dataclass
class Scores:
    ppl: dict[str, float]          # per domain
    ratio: dict[str, float]        # ppl / dense ppl, per domain
    kl: float                      # WikiText-2 test, KL(dense || model) per token
    top1: float

    def cells(self) -> str:
        return " ".join(f"{self.ppl[d]:9.2f} {self.ratio[d]:6.2f}" for d in DOMAINS) + \
            f" {self.kl:7.4f} {self.top1:6.3f}"


def header() -> str:
    return " ".join(f"{d + ' ppl':>9s} {'x':>6s}" for d in DOMAINS) + f" {'KL':>7s} {'top-1':>6s}"


class Domains:
    """The evaluation windows of every shipped domain and the dense model's scores."""

    def __init__(self, dense, tokenizer, windows: int = 40, seqlen: int = 512):
        self.windows = {name: evaluation_windows(tokenize(tokenizer, text), seqlen, windows,
                                                 what=name)
                        for name, text in evaluation_texts(None).items()}
        self.reference = reference_log_probs(dense, self.windows[IN_DOMAIN], progress=False)
        self.dense_ppl = {name: evaluate(dense, w, progress=False).perplexity
                          for name, w in self.windows.items()}
        self.dense = Scores(self.dense_ppl, {d: 1.0 for d in DOMAINS}, 0.0, 1.0)

    @torch.no_grad()
    def score(self, model) -> Scores:
        ppl, kl, top1 = {}, 0.0, 1.0
        for name, w in self.windows.items():
            report = evaluate(model, w, self.reference if name == IN_DOMAIN else None,
                              progress=False)
            ppl[name] = report.perplexity
            if name == IN_DOMAIN:
                kl, top1 = report.kl, report.top1_agreement
        return Scores(ppl, {d: ppl[d] / self.dense_ppl[d] for d in ppl}, kl, top1)

    def describe(self) -> str:
        return ", ".join(f"{d} {w.shape[0]} x {w.shape[1]}" for d, w in self.windows.items())
