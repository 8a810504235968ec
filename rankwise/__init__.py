"""rankwise: low-rank factorization of trained networks, chosen with information geometry."""
__version__ = "0.1.0"

from .compress import Summary, compress_
from .config import CalibrationConfig, CompressConfig
from .entrypoints import (CompressJob, EvalConfig, HealRun, compress_model, evaluate_model,
                          finetune_model, heal_model)
from .errors import RankwiseError
from .evaluate import evaluate
from .io import load, save
from .layers import LowRankLinear
from .speed import accelerate, measure_speed
from .train import FinetuneConfig, FinetuneRun
from .train.heal import HealConfig

__all__ = ["accelerate", "CalibrationConfig", "CompressConfig", "CompressJob", "EvalConfig", "FinetuneConfig",
           "FinetuneRun", "HealConfig", "HealRun", "LowRankLinear", "RankwiseError", "Summary", "compress_",
           "compress_model", "evaluate", "evaluate_model", "finetune_model", "heal_model", "load",
           "measure_speed", "save", "__version__"]
