"""Engines that run rankwise outputs at their size: what each engine's kernels run packed
(engines.py), and vLLM's plugin (vllm_plugin.py registers the architecture and its config,
vllm_model.py builds an output on vLLM's own implementation of its base family)."""
