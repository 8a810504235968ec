"""The pipelines a user runs end to end, from a model spec and config objects to a saved,
evaluated result; the command-line verbs are thin layers over these."""
from .compress import CompressOutcome, CompressRun, compress_model
from .evaluate import EvalConfig, EvalOutcome, evaluate_model
from .finetune import finetune_model
from .heal import HealRun, heal_model

__all__ = ["CompressRun", "CompressOutcome", "EvalConfig", "EvalOutcome", "compress_model", "evaluate_model",
           "finetune_model", "HealRun", "heal_model"]
