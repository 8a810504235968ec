"""Where the calibration windows come from (CalibrationConfig), validated at construction."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RankwiseError
from ..options import check_int, check_number, option
from .windows import DOMAINS, SELF, Draw

# measured to generalise best (README, "Calibration that generalises"): every shipped domain
# and the model's own samples, in equal parts
DEFAULT_CALIBRATION = (*DOMAINS, SELF)


@dataclass
class CalibrationConfig:
    """Where the calibration windows come from."""
    calib: list[str] = option(
        help="calibration sources, each NAME[:WEIGHT]: a shipped domain's calibration part "
             f"({', '.join(DOMAINS)}), a text file, or {SELF} (text sampled from the dense "
             "model: data-free); the windows are split by weight",
        factory=lambda: list(DEFAULT_CALIBRATION), aliases=("calib_text",), metavar="SOURCE")
    calib_samples: int = option(32, "number of calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "seed of the windows, of self-sampling and of the sampled labels")
    batch_size: int = option(4, "windows per forward pass")
    self_temperature: float = option(1.0, f"{SELF} calibration: sampling temperature")
    self_top_p: float = option(0.95, f"{SELF} calibration: nucleus (top-p) mass, in (0, 1]")

    def __post_init__(self):
        if isinstance(self.calib, str):
            self.calib = [self.calib]
        if not isinstance(self.calib, list) or not self.calib:
            raise RankwiseError(f"calib must be a list of sources, got {self.calib!r}")
        self.self_temperature = check_number("self_temperature", self.self_temperature, 0)
        self.self_top_p = check_number("self_top_p", self.self_top_p, 0, 1, high_open=False)
        check_int("calib_samples", self.calib_samples)
        check_int("seqlen", self.seqlen, 2)
        check_int("seed", self.seed, 0)
        check_int("batch_size", self.batch_size)

    def draw(self) -> Draw:
        return Draw(self.calib_samples, self.seqlen, self.seed, self.self_temperature,
                    self.self_top_p)
