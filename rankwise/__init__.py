"""rankwise: low-rank factorization of trained networks, chosen with information geometry."""
__version__ = "0.1.0"

from .compress import Summary, compress_
from .config import CompressConfig
from .errors import RankwiseError
from .evaluate import evaluate, measure_speed
from .io import load, save
from .layers import LowRankLinear

__all__ = ["CompressConfig", "LowRankLinear", "RankwiseError", "Summary", "compress_",
           "evaluate", "load", "measure_speed", "save", "__version__"]
