"""Fine-tuning under a rank constraint: factors, hard (TRP), svt (proximal)."""
from .config import METHODS, OPTIMIZERS, PENALTIES, FinetuneConfig
from .loop import FinetuneResult, StepRecord, finetune, history_json
from .tasks import LanguageTask

__all__ = ["METHODS", "OPTIMIZERS", "PENALTIES", "FinetuneConfig", "FinetuneResult",
           "LanguageTask", "StepRecord", "finetune", "history_json"]
