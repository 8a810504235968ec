"""vLLM's entry point into rankwise (`vllm.general_plugins`): the architecture of rankwise
outputs and their configuration, registered without importing vLLM's model code, so
`vllm serve OUT` and `LLM(model=OUT)` load an output with no remote code.

vLLM calls `register` with no arguments in every process it starts (the engine, each
worker, the registry's inspection process), possibly more than once; it only registers.
The model itself is imported lazily by vLLM (rankwise.serving.vllm_model).
"""
from __future__ import annotations

import functools

from transformers import PretrainedConfig

ARCHITECTURE = "RankwiseForCausalLM"
MODEL = "rankwise.serving.vllm_model:RankwiseForCausalLM"


def register() -> None:
    """Register the `rankwise` model type with transformers and its architecture with vLLM."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    AutoConfig.register("rankwise", RankwiseConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL)


class RankwiseConfig(PretrainedConfig):
    """The config of model type `rankwise`: read from a folder's config.json as its base
    family's own config class (a subclass of it with this model type), so every attribute
    vLLM reads of the base family is there, with `rankwise_layers` and the rest beside."""
    model_type = "rankwise"

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        check_servable(config_dict)
        return family_config(config_dict["rankwise_base_model_type"]).from_dict(config_dict,
                                                                                **kwargs)


def check_servable(config: dict) -> None:
    """One sentence, before vLLM builds anything, when the plugin cannot serve a folder
    (config.json's content): a family vLLM does not build with its own named linear
    layers, or a layer of a form the plugin does not build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm.model_executor.models.registry import ModelRegistry

    from ..errors import RankwiseError
    from ..formats.hf import known_causal_lm_type
    from .vllm_model import FORMS
    base = known_causal_lm_type(config.get("rankwise_base_model_type"))
    model = ModelRegistry._try_load_model_cls(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base])
    if not getattr(model, "packed_modules_mapping", None):
        raise RankwiseError(f"rankwise's vLLM plugin serves the families vLLM builds itself with "
                            f"named linear layers (Llama, Qwen2, Gemma, Phi-3, OPT, ...), not "
                            f"{base!r}; export the output with --format dense to serve it")
    for name, layer in (config.get("rankwise_layers") or {}).items():
        if not isinstance(layer, dict) or layer.get("form") not in FORMS:
            raise RankwiseError(f"{name} is a {layer.get('form') if isinstance(layer, dict) else layer!r}"
                                f" layer, which rankwise's vLLM plugin does not build (it builds "
                                f"{', '.join(FORMS)}); export the output with --format dense")


def family_config(base: str):
    """The config class of a rankwise output built on model type `base`."""
    from transformers import CONFIG_MAPPING
    return _derived(CONFIG_MAPPING[base])


@functools.cache
def _derived(parent: type) -> type:
    # named in this module, where pickling (vLLM sends configs to its workers) finds it
    return type(f"Rankwise{parent.__name__}", (parent,),
                {"model_type": "rankwise", "__module__": __name__})


def __getattr__(name: str):
    """A derived config class by name (module docstring of `_derived`): what unpickling in
    a fresh process asks this module for."""
    from transformers import CONFIG_MAPPING
    for parent in CONFIG_MAPPING.values():
        if name == f"Rankwise{parent.__name__}":
            return _derived(parent)
    raise AttributeError(name)
