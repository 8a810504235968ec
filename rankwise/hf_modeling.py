"""A low-rank factorized causal LM written by rankwise, loadable by plain transformers.

This file is copied into every rankwise output folder as modeling_rankwise.py, with the
base architecture filled in; `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` then loads the folder where rankwise is not installed. It imports
nothing but torch and transformers. The model is the base architecture itself (its
attention goes through transformers' shared attention interface, so attention backends
and vLLM's Transformers backend see a standard model) with the layers named in
`config.rankwise_ranks` replaced by two thin matmuls, y = B (A x) + bias; the groups of
those layers that read one input (`config.rankwise_siblings`: q/k/v, gate/up) run their
first factors as one stacked matmul at inference.
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

    def __init__(self, rankwise_ranks=None, rankwise_siblings=None, **kwargs):
        self.rankwise_ranks = dict(rankwise_ranks or {})
        self.rankwise_siblings = [list(g) for g in rankwise_siblings or []]
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

    _siblings, _sibling_index = None, 0

    def forward(self, x):
        group = self._siblings
        if group is not None and x.numel() >= 64 * x.shape[-1] and \
                not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return F.linear(group.first_factor(self._sibling_index, x), self.B, self.bias)
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class _Siblings:
    """Factored layers that read one input (config.rankwise_siblings): their A factors are
    slices of one stacked matrix, run as one matmul per input of at least 64 rows without
    autograd (rankwise's layers.Siblings, which documents the rules; written again here so
    that this file needs nothing but torch and transformers)."""

    def __init__(self, members):
        self.members, self.everyone = members, (1 << len(members)) - 1
        self.x = self.version = self.h = None
        self.served = 0
        self._stack()
        for i, m in enumerate(members):
            m._siblings, m._sibling_index = self, i

    def _stack(self):
        ends = torch.tensor([m.A.shape[0] for m in self.members]).cumsum(0).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        with torch.no_grad(), torch.inference_mode(False):
            self.stacked = torch.cat([m.A.detach() for m in self.members])
        for m, (lo, hi) in zip(self.members, self.bounds):
            m.A.data = self.stacked[lo:hi]
        row = self.stacked.stride(0) * self.stacked.element_size()
        self.layout = [(self.stacked.data_ptr() + lo * row, hi - lo) for lo, hi in self.bounds]

    def _stacked_still(self):
        return all(m._parameters["A"].data_ptr() == ptr and m._parameters["A"].shape[0] == rows
                   for m, (ptr, rows) in zip(self.members, self.layout))

    def first_factor(self, i, x):
        version = -1 if x.is_inference() else x._version
        if x is not self.x or version != self.version or self.served >> i & 1:
            if not self._stacked_still():
                self._stack()
            self.x, self.version, self.h, self.served = x, version, F.linear(x, self.stacked), 0
        self.served |= 1 << i
        lo, hi = self.bounds[i]
        h = self.h[..., lo:hi]
        if self.served == self.everyone:
            self.x = self.version = self.h = None
        return h


def _own_storage(module, state_dict, prefix, local_metadata):
    if module._siblings is not None and prefix + "A" in state_dict:
        state_dict[prefix + "A"] = state_dict[prefix + "A"].clone()


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
            layer = LowRankLinear(in_features, out_features, int(rank), dense.bias is not None,
                                  dense.weight.device, dense.weight.dtype)
            layer.register_state_dict_post_hook(_own_storage)
            setattr(owner, child, layer)
        self._rankwise_fused = False
        self.register_forward_pre_hook(RankwiseForCausalLM._fuse)

    def _fuse(self, args):
        """On the first call, when the weights are loaded: fuse the sibling groups."""
        if self._rankwise_fused:
            return
        self._rankwise_fused = True
        for names in self.config.rankwise_siblings:
            members = [self.get_submodule(n) for n in names]
            if all(isinstance(m, LowRankLinear) for m in members):
                _Siblings(members)
