"""What makes an output folder loadable without rankwise: a config.json of model type
`rankwise` mapped (auto_map) to the self-contained modeling_rankwise.py written beside it.
A leaf module: the writer (io) and the exporter (export) both build on it."""
from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from ..errors import RankwiseError

MODELING_FILE = "modeling_rankwise.py"
AUTO_MAP = {"AutoConfig": "modeling_rankwise.RankwiseConfig",
            "AutoModelForCausalLM": "modeling_rankwise.RankwiseForCausalLM"}
_TEMPLATE = Path(__file__).with_name("modeling.py")
LEGACY_KEYS = ("rankwise_ranks", "rankwise_corrections")     # 0.1.0's structure


def base_model_type(config) -> str:
    """The architecture a model (or a rankwise output's config) is built on, checked to be
    a causal LM type transformers knows: it is written into modeling_rankwise.py, which
    `trust_remote_code=True` runs, and any source config.json may carry it."""
    return known_causal_lm_type(getattr(config, "rankwise_base_model_type", None)
                                or config.model_type)


def known_causal_lm_type(name) -> str:
    """`name` when it is a model type with a causal LM in this transformers; otherwise one
    sentence."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not isinstance(name, str) or name not in CONFIG_MAPPING or \
            name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        shown = name if isinstance(name, str) and len(name) <= 40 else f"{str(name)[:40]}..."
        raise RankwiseError(f"the model type {shown!r} in the source config is not a causal "
                            "LM architecture this transformers knows; rankwise writes only "
                            "known architectures into an output")
    return name


def hf_config(model: nn.Module, structure: dict[str, dict], siblings: list[list[str]]) -> dict:
    """config.json of a compressed model: the base configuration, model type `rankwise`,
    the structure of its composite layers ({name: {"form", "rank"}}: what the modeling file
    builds), the groups of factored layers that read one input (fused for inference when
    loaded), and the auto_map that points transformers at modeling_rankwise.py. A source's
    own quantization_config is dropped: the writer adds the one of what it stores."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    base = base_model_type(model.config)
    config.update(model_type="rankwise", architectures=["RankwiseForCausalLM"],
                  auto_map=AUTO_MAP, rankwise_base_model_type=base, rankwise_layers=structure,
                  rankwise_siblings=siblings)
    return config


def modeling_source(base: str) -> str:
    """modeling_rankwise.py for a base model type (checked to be a known one, written as a
    string literal)."""
    literal = repr(known_causal_lm_type(base))
    source, count = re.subn(r'^BASE_MODEL_TYPE = ".*?"', lambda _: f"BASE_MODEL_TYPE = {literal}",
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
                    "rankwise_layers", "rankwise_siblings", "transformers_version",
                    *LEGACY_KEYS):
            data.pop(key, None)
        return AutoConfig.for_model(base, **data)
    except (OSError, ValueError, KeyError) as e:
        raise RankwiseError(f"{folder / 'config.json'} is missing or invalid: {e}") from None
