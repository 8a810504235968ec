"""CompressConfig: what to compress and how; validated at construction, YAML round-trip."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import RankwiseError
from .geometry import DEFAULT_DAMPING, METRICS

ALLOCATIONS = ("uniform", "spectrum", "search")


@dataclass
class CompressConfig:
    """metric: projection metric (svd, whiten, fisher, kfac).
    ratio: fraction of the targeted linear layers' parameters to remove, in (0, 1).
    include / exclude: regexes on module names selecting the targeted nn.Linear layers.
    allocation: how ranks are chosen per layer under the global budget: uniform (every
        layer loses `ratio`), spectrum (global choice from the metric's per-direction
        loss spectra; layers may stay dense) or search (evolutionary search seeded from
        spectrum, fitness = KL to the dense model on held-out calibration windows).
    search_generations / search_seconds: limits of the search (whichever comes first).
    search_windows: calibration windows held out from the statistics as the search's
        fitness data. search_offspring: candidates per generation.
    min_rank: smallest rank the spectrum allocation may give a layer.
    steps: reach the ratio in this many stages, re-measuring statistics on the partly
        compressed model before each (1 = one-shot).
    sequential: cut block by block, each block's input statistics re-measured on the
        outputs of the blocks already cut (whiten and kfac, which use the inputs).
    rank_pattern: explicit {regex: rank} overrides (peft-style), matched on layer names.
    damping: relative eigenvalue damping of the covariances (times their mean eigenvalue).
    """
    metric: str = "kfac"
    ratio: float = 0.2
    include: str | None = None
    exclude: str | None = None
    allocation: str = "uniform"
    min_rank: int = 1
    steps: int = 1
    sequential: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    damping: float = DEFAULT_DAMPING
    search_generations: int = 50
    search_seconds: float | None = None
    search_windows: int = 4
    search_offspring: int = 8

    def __post_init__(self):
        if self.metric not in METRICS:
            raise RankwiseError(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        try:
            self.ratio = float(self.ratio)
        except (TypeError, ValueError):
            raise RankwiseError(f"ratio must be a number in (0, 1), got {self.ratio!r}") from None
        if not 0 < self.ratio < 1:
            raise RankwiseError(f"ratio must be in (0, 1) (the fraction of parameters removed), "
                                f"got {self.ratio}")
        if self.allocation not in ALLOCATIONS:
            raise RankwiseError(f"unknown allocation {self.allocation!r}; "
                                f"choose one of {', '.join(ALLOCATIONS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise RankwiseError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.sequential, bool):
            raise RankwiseError(f"sequential must be true or false, got {self.sequential!r}")
        if self.sequential and not self.needs_inputs:
            raise RankwiseError(f"sequential mode re-measures the layers' inputs, which metric "
                                f"{self.metric!r} does not use; use whiten or kfac")
        if not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise RankwiseError(f"min_rank must be a positive integer, got {self.min_rank!r}")
        for name in ("search_generations", "search_windows", "search_offspring"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise RankwiseError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.search_seconds is not None and not float(self.search_seconds) > 0:
            raise RankwiseError(f"search_seconds must be positive, got {self.search_seconds!r}")
        if self.allocation == "search" and self.metric == "svd":
            raise RankwiseError("allocation 'search' is seeded from the metric's spectra; "
                                "use it with whiten, fisher or kfac")
        if not (isinstance(self.damping, (int, float)) and 0 <= self.damping < 1):
            raise RankwiseError(f"damping must be in [0, 1), got {self.damping!r}")
        for pattern in (self.include, self.exclude, *self.rank_pattern):
            try:
                re.compile(pattern or "")
            except re.error as e:
                raise RankwiseError(f"invalid regular expression {pattern!r}: {e}") from None
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank < 1:
                raise RankwiseError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")

    @property
    def needs_inputs(self) -> bool:
        return self.metric in ("whiten", "kfac")

    @property
    def gradients(self) -> str | None:
        return {"kfac": "full", "fisher": "diag"}.get(self.metric)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise RankwiseError(f"unknown compression option(s) {sorted(unknown)}; "
                                f"accepted: {sorted(known)}")
        return cls(**d)


def read_yaml(path: str | Path) -> dict:
    """A recipe file: a mapping of option names (dashes or underscores) to values."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RankwiseError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RankwiseError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RankwiseError(f"config file {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def write_yaml(config: CompressConfig, path: str | Path) -> None:
    import yaml
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
