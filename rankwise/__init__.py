"""rankwise: low-rank factorization of trained networks, chosen with information geometry."""
from .cut.compress import Summary, compress_
from .cut.config import CompressConfig
from .data.config import CalibrationConfig
from .entrypoints import (CompressRun, EvalConfig, HealRun, compress_model, evaluate_model,
                          finetune_model, heal_model)
from .entrypoints.finetune import FinetuneRun
from .errors import RankwiseError
from .evaluation.scoring import evaluate
from .evaluation.speed import accelerate, measure_speed
from .formats.folder import load, save
from .models.layers import LowRankLinear
from .train import FinetuneConfig
from .train.heal import HealConfig
from .version import __version__

__all__ = ["accelerate", "CalibrationConfig", "CompressConfig", "CompressRun", "EvalConfig", "FinetuneConfig",
           "FinetuneRun", "HealConfig", "HealRun", "LowRankLinear", "RankwiseError", "Summary", "compress_",
           "compress_model", "evaluate", "evaluate_model", "finetune_model", "heal_model", "load",
           "measure_speed", "save", "__version__"]
