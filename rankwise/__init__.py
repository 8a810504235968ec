"""rankwise: low-rank factorization of trained networks, chosen with information geometry."""
from .version import __version__

from .compress import Summary, compress_
from .config import CalibrationConfig, CompressConfig
from .entrypoints import (CompressRun, EvalConfig, HealRun, compress_model, evaluate_model,
                          finetune_model, heal_model)
from .errors import RankwiseError
from .evaluate import evaluate
from .io import load, save
from .layers import LowRankLinear
from .speed import accelerate, measure_speed
from .entrypoints.finetune import FinetuneRun
from .train import FinetuneConfig
from .train.heal import HealConfig

__all__ = ["accelerate", "CalibrationConfig", "CompressConfig", "CompressRun", "EvalConfig", "FinetuneConfig",
           "FinetuneRun", "HealConfig", "HealRun", "LowRankLinear", "RankwiseError", "Summary", "compress_",
           "compress_model", "evaluate", "evaluate_model", "finetune_model", "heal_model", "load",
           "measure_speed", "save", "__version__"]
