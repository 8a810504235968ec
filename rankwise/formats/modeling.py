"""A low-rank factorized causal LM written by rankwise, loadable by plain transformers.

This file is copied into every rankwise output folder as modeling_rankwise.py, with the
base architecture filled in; `AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)` then loads the folder where rankwise is not installed. It imports
nothing but torch and transformers. The model is the base architecture itself (its
attention goes through transformers' shared attention interface, so attention backends
see a standard model) with the layers `config.rankwise_layers` names replaced by their
form's module: "lowrank", two thin nn.Linear factors, y = B (A x) + bias; "corrected", a
weight plus a low-rank correction, y = base(x) + B (A x). The groups of factored layers
that read one input (`config.rankwise_siblings`: q/k/v, gate/up) run their first factors
as one stacked matmul at inference. Weights on integer grids are read by transformers'
compressed-tensors integration, which the folder's quantization_config names; 3-bit
weights are packed densely, which compressed-tensors reads from 0.18 on.
"""
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

BASE_MODEL_TYPE = "llama"       # rankwise writes the compressed model's own type here

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseModel = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])


class RankwiseConfig(_BaseConfig):
    """The base configuration plus `rankwise_layers` ({module name: {"form", "rank"}}) and
    `rankwise_siblings` (lists of module names)."""
    model_type = "rankwise"

    def __init__(self, rankwise_layers=None, rankwise_siblings=None, **kwargs):
        self.rankwise_layers = dict(rankwise_layers or {})
        self.rankwise_siblings = [list(g) for g in rankwise_siblings or []]
        super().__init__(**kwargs)


class LowRankLinear(nn.Module):
    """A linear map stored as two plain nn.Linear factors, A (in -> rank) then B (rank ->
    out, with the bias): weight = B.weight @ A.weight, never formed in forward. Quantizers
    that work on nn.Linear modules (compressed-tensors, torchao, bitsandbytes) take each
    factor as it is."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, **kw)
        self.B = nn.Linear(rank, out_features, bias=bias, **kw)

    _siblings, _sibling_index = None, 0

    def forward(self, x):
        group = self._siblings
        if group is not None and x.numel() >= 64 * x.shape[-1] and \
                not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            h = group.first_factor(self._sibling_index, x)
            if h is not None:
                return self.B(h)
        return self.B(self.A(x))

    def extra_repr(self):
        return f"rank={self.rank}"


class CorrectedLinear(nn.Module):
    """A weight (on an integer grid, as stored) plus a low-rank correction of its rounding
    error: y = base(x) + B (A x), the bias on `base`."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.base = nn.Linear(in_features, out_features, bias=bias, **kw)
        self.A = nn.Linear(in_features, rank, bias=False, **kw)
        self.B = nn.Linear(rank, out_features, bias=False, **kw)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))

    def extra_repr(self):
        return f"correction rank={self.rank}"


def _plain(module):
    weight = getattr(module, "weight", None)
    return type(module) is nn.Linear and weight is not None and \
        type(weight.data) is torch.Tensor and weight.dtype.is_floating_point


class _Siblings:
    """Factored layers that read one input (config.rankwise_siblings): their A weights are
    slices of one stacked matrix, run as one matmul per input of at least 64 rows without
    autograd, while they are plain float nn.Linear weights (rankwise's layers.Siblings,
    which documents the rules; written again here so that this file needs nothing but
    torch and transformers)."""

    def __init__(self, members):
        self.members, self.everyone = members, (1 << len(members)) - 1
        self.x = self.version = self.h = None
        self.served = 0
        self.layout = []
        self._stack()
        for i, m in enumerate(members):
            m._siblings, m._sibling_index = self, i

    def _stack(self):
        if not all(_plain(m.A) for m in self.members) or \
                len({(m.A.weight.dtype, m.A.weight.device) for m in self.members}) != 1:
            self.layout = []
            return False
        weights = [m.A.weight for m in self.members]
        ends = torch.tensor([w.shape[0] for w in weights]).cumsum(0).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        with torch.no_grad(), torch.inference_mode(False):
            self.stacked = torch.cat([w.detach() for w in weights])
        for w, (lo, hi) in zip(weights, self.bounds):
            w.data = self.stacked[lo:hi]
        row = self.stacked.stride(0) * self.stacked.element_size()
        self.layout = [(self.stacked.data_ptr() + lo * row, hi - lo) for lo, hi in self.bounds]
        return True

    def _stacked_still(self):
        return bool(self.layout) and all(
            _plain(m.A) and m.A.weight.data_ptr() == ptr and m.A.weight.shape[0] == rows
            for m, (ptr, rows) in zip(self.members, self.layout))

    def first_factor(self, i, x):
        version = -1 if x.is_inference() else x._version
        if x is not self.x or version != self.version or self.served >> i & 1:
            if not self._stacked_still() and not self._stack():
                return None
            self.x, self.version, self.h, self.served = x, version, F.linear(x, self.stacked), 0
        self.served |= 1 << i
        lo, hi = self.bounds[i]
        h = self.h[..., lo:hi]
        if self.served == self.everyone:
            self.x = self.version = self.h = None
        return h


def _own_storage(module, state_dict, prefix, local_metadata):
    key = prefix + "A.weight"
    if module._siblings is not None and key in state_dict:
        state_dict[key] = state_dict[key].clone()


FORMS = {"lowrank": LowRankLinear, "corrected": CorrectedLinear}


def _check_packing(config):
    """compressed-tensors before 0.18 packed 3-bit weights ten to a word; this folder packs
    them densely, which such a release would misread without a word."""
    declared = getattr(config, "quantization_config", None) or {}
    declared = declared if isinstance(declared, dict) else declared.to_dict()
    groups = declared.get("config_groups") or {}
    if any((g.get("weights") or {}).get("num_bits") not in (2, 4, 8) for g in groups.values()):
        import compressed_tensors
        release = tuple(int(p) for p in compressed_tensors.__version__.split(".")[:2])
        if release < (0, 18):
            raise ImportError(f"this folder packs 3-bit weights densely, which "
                              f"compressed-tensors {compressed_tensors.__version__} misreads; "
                              "install compressed-tensors>=0.18, or load it with rankwise")


class RankwiseForCausalLM(_BaseModel):
    config_class = RankwiseConfig

    def __init__(self, config):
        _check_packing(config)
        super().__init__(config)
        for name, layer in config.rankwise_layers.items():
            if layer.get("form") not in FORMS:
                raise ValueError(f"{name}: form {layer.get('form')!r} is not one this file "
                                 f"builds ({', '.join(FORMS)}); load the folder with rankwise")
            kind = FORMS[layer["form"]]
            owner_name, _, child = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            dense = getattr(owner, child)     # nn.Linear, or GPT-2's Conv1D (nf out, nx in)
            out_features, in_features = (dense.nf, dense.nx) if hasattr(dense, "nf") else \
                (dense.out_features, dense.in_features)
            module = kind(in_features, out_features, int(layer["rank"]), dense.bias is not None,
                          dense.weight.device, dense.weight.dtype)
            if kind is LowRankLinear:
                module.register_state_dict_post_hook(_own_storage)
            setattr(owner, child, module)
        self._rankwise_fused = False
        self.register_forward_pre_hook(RankwiseForCausalLM._fuse)

    def _fuse(self, args):
        """On the first eager call, when the weights are loaded: fuse the sibling groups.
        Never while torch.compile traces (a fullgraph compile refuses the `.data`
        assignment stacking does; compiled graphs run every layer's own matmuls anyway)."""
        if self._rankwise_fused or torch.compiler.is_compiling():
            return
        self._rankwise_fused = True
        for names in self.config.rankwise_siblings:
            members = [self.get_submodule(n) for n in names]
            if all(isinstance(m, LowRankLinear) for m in members):
                _Siblings(members)
