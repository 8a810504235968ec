"""How an output's float weights are stored (StorageConfig)."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import check_choice, option

SAVE_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class StorageConfig:
    """How an output's float weights are stored (integer grids are chosen by the
    compression: CompressConfig's bits, factor_bits, group_size)."""
    save_dtype: str = option("auto", "dtype of the stored float weights (auto: the source's "
                                     "16-bit dtype, float16 for a float16 source, else "
                                     "bfloat16; --dtype decides how the model runs)",
                             choices=SAVE_DTYPES)

    def __post_init__(self):
        check_choice("save_dtype", self.save_dtype, SAVE_DTYPES)
