"""What makes an output folder loadable without rankwise: a config.json of model type
`rankwise` mapped (auto_map) to the self-contained modeling_rankwise.py written beside it;
and the dense export (factors merged back) for runtimes without factorized layers."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import RankwiseError
from .options import option

MODELING_FILE = "modeling_rankwise.py"
AUTO_MAP = {"AutoConfig": "modeling_rankwise.RankwiseConfig",
            "AutoModelForCausalLM": "modeling_rankwise.RankwiseForCausalLM"}
_TEMPLATE = Path(__file__).with_name("hf_modeling.py")


def base_model_type(config) -> str:
    return getattr(config, "rankwise_base_model_type", None) or config.model_type


def hf_config(model: nn.Module, ranks: dict[str, int]) -> dict:
    """config.json of a factorized model: the base configuration, model type `rankwise`,
    the ranks, and the auto_map that points transformers at modeling_rankwise.py."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)   # weights are plain floats once saved
    base = base_model_type(model.config)
    config.update(model_type="rankwise", architectures=["RankwiseForCausalLM"],
                  auto_map=AUTO_MAP, rankwise_base_model_type=base, rankwise_ranks=ranks)
    return config


def modeling_source(base: str) -> str:
    """modeling_rankwise.py for a base model type."""
    source, count = re.subn(r'^BASE_MODEL_TYPE = ".*?"', f'BASE_MODEL_TYPE = "{base}"',
                            _TEMPLATE.read_text(), count=1, flags=re.M)
    assert count == 1, "the modeling template lost its BASE_MODEL_TYPE line"
    return source


def base_config(folder: Path):
    """The base architecture's config from a folder's config.json (rankwise or plain),
    built without running the folder's code."""
    from transformers import AutoConfig
    try:
        data = json.loads((folder / "config.json").read_text())
        base = data.get("rankwise_base_model_type") or data["model_type"]
        for key in ("model_type", "architectures", "auto_map", "rankwise_base_model_type",
                    "rankwise_ranks", "transformers_version"):
            data.pop(key, None)
        return AutoConfig.for_model(base, **data)
    except (OSError, ValueError, KeyError) as e:
        raise RankwiseError(f"{folder / 'config.json'} is missing or invalid: {e}") from None


@dataclass
class ExportConfig:
    model: str | None = option(None, "the rankwise output folder to export", positional=True,
                               required=True)
    dense: str | None = option(None, "write a plain dense checkpoint (every factor pair "
                                     "merged into its weight) to this folder", required=True)


def export_dense(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Merge every factor pair of the rankwise output `folder` back into a dense weight
    and save a plain transformers checkpoint (the base architecture) to `out`."""
    from .io import check_output_folder, open_model
    from .layers import LowRankLinear, set_module
    out = check_output_folder(out)
    model, tokenizer, _, _ = open_model(folder, need_tokenizer=False)
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankLinear):
            set_module(model, name, module.merge())
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
