"""A low-rank factorized causal LM written by rankwise, loadable by plain transformers.

This file is copied into every rankwise output folder as modeling_rankwise.py, with the
base architecture filled in; `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` then loads the folder where rankwise is not installed. It imports
nothing but torch and transformers. The model is the base architecture itself (its
attention goes through transformers' shared attention interface, so attention backends
and vLLM's Transformers backend see a standard model) with the layers named in
`config.rankwise_ranks` replaced by two thin matmuls, y = B (A x) + bias.
"""
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import transformers

BASE_MODEL_TYPE = "llama"       # rankwise writes the compressed model's own type here

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseModel = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


class RankwiseConfig(_BaseConfig):
    """The base configuration plus `rankwise_ranks`: {module name: rank}."""
    model_type = "rankwise"

    def __init__(self, rankwise_ranks=None, **kwargs):
        self.rankwise_ranks = dict(rankwise_ranks or {})
        super().__init__(**kwargs)


class LowRankLinear(nn.Module):
    """A linear map stored as factors: weight = B @ A, never formed in forward."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        if not self.A.is_meta:
            nn.init.normal_(self.A, std=in_features ** -0.5)
            nn.init.normal_(self.B, std=rank ** -0.5)

    def forward(self, x):
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class RankwiseForCausalLM(_BaseModel):
    config_class = RankwiseConfig

    def __init__(self, config):
        super().__init__(config)
        for name, rank in config.rankwise_ranks.items():
            owner_name, _, child = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            dense = getattr(owner, child)        # nn.Linear, or GPT-2's Conv1D (nf out, nx in)
            out_features, in_features = (dense.nf, dense.nx) if hasattr(dense, "nf") else \
                (dense.out_features, dense.in_features)
            setattr(owner, child, LowRankLinear(in_features, out_features, int(rank),
                                                dense.bias is not None, dense.weight.device,
                                                dense.weight.dtype))
