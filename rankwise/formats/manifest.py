"""rankwise.json, the manifest of an output folder: one typed, versioned record, written by
`write` and read by `read` and nothing else.

What a loader needs is `structure` (the layers whose kind has a module of its own, with
their form and rank) and `storage` (what the weights file holds); the rest says how the
folder was made: its source model, the recipe, the calibration, each targeted layer's form
with its stored bits and predicted loss, what rounding, search, refinement, healing or
fine-tuning did, the versions that made it. Folders written by 0.1.0 (format rankwise/1,
ranks and corrections as two maps) are read as well; keys a newer release added are kept
as they are (`extra`) and written back unchanged.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RankwiseError
from ..forms.kinds import CORRECTED, LOW_RANK

NAME = "rankwise.json"
FORMAT = "rankwise/2"
_FORMAT_1 = "rankwise/1"
_LEGACY_KINDS = {"ranks": LOW_RANK.name, "corrections": CORRECTED.name}   # rankwise/1's maps


@dataclass
class StorageRecord:
    """What the weights file holds: the float dtype, the grids it uses, its bytes, and the
    stored bits per original weight parameter of the targeted layers (everything stored
    for them: integers, scales, factors, corrections, biases)."""
    dtype: str
    grids: list[str] = field(default_factory=list)
    tensor_bytes: int = 0
    targeted_bytes: int = 0
    bits_per_targeted_param: float | None = None


@dataclass
class Manifest:
    source_model: str | None = None     # the model it was made from (the dense reference)
    structure: dict[str, dict] = field(default_factory=dict)     # name -> {"form", "rank"}
    forms: dict[str, dict] = field(default_factory=dict)         # targeted name -> its record
    targeted_params: dict[str, int] = field(default_factory=dict)   # {"dense", "compressed"}
    achieved_ratio: float | None = None
    bits: float | None = None           # stored bits per original targeted parameter
    config: dict | None = None          # the compression recipe as run
    calibration: dict | None = None
    rounding: dict | None = None
    seconds: dict = field(default_factory=dict)
    decompositions: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    refinement: dict | None = None
    search: dict | None = None
    quantized: dict | None = None       # rankwise quantize's recipe
    heal: dict | None = None
    finetune: dict | None = None
    objective: str | None = None
    evaluation: dict | None = None
    export: str | None = None
    serving: dict | None = None         # per engine: what it runs packed, repacks, dequantizes
    storage: StorageRecord | None = None
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    format: str = FORMAT

    @property
    def ranks(self) -> dict[str, int]:
        """The rank of every layer held as low-rank factors."""
        return {name: s["rank"] for name, s in self.structure.items()
                if s["form"] == LOW_RANK.name}

    def to_json(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("extra", "format")}
        record["storage"] = dataclasses.asdict(self.storage) if self.storage else None
        return {"format": FORMAT, **{k: v for k, v in record.items() if v not in (None, {})},
                **self.extra}

    @classmethod
    def from_json(cls, record, where: str = NAME) -> "Manifest":
        """A manifest from its JSON (either format), or one sentence saying why not."""
        if not isinstance(record, dict) or record.get("format") not in (_FORMAT_1, FORMAT):
            raise RankwiseError(f"{where} is not a {FORMAT} manifest")
        record = dict(record)
        if record.pop("format") == _FORMAT_1:
            record["structure"] = {name: {"form": kind, "rank": rank}
                                   for key, kind in _LEGACY_KINDS.items()
                                   for name, rank in (record.pop(key, None) or {}).items()}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "format"}
        values = {k: v for k, v in record.items() if k in known}
        try:
            if values.get("storage") is not None:
                values["storage"] = StorageRecord(**values["storage"])
            manifest = cls(**values, extra={k: v for k, v in record.items() if k not in known})
            _check(manifest)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise RankwiseError(f"{where} is not a {FORMAT} manifest ({e})") from None
        return manifest


def _check(manifest: Manifest) -> None:
    """The parts a loader relies on have the types it reads."""
    for name, s in manifest.structure.items():
        if not isinstance(name, str) or not isinstance(s, dict) or \
                not isinstance(s.get("form"), str) or isinstance(s.get("rank"), bool) or \
                not isinstance(s.get("rank"), int):
            raise ValueError(f"bad structure entry {name!r}")
    for key in ("forms", "targeted_params", "seconds", "run", "versions"):
        if not isinstance(getattr(manifest, key), dict):
            raise ValueError(f"{key} is not a mapping")
    if manifest.source_model is not None and not isinstance(manifest.source_model, str):
        raise ValueError("source_model is not a string")


def write(folder: Path, manifest: Manifest) -> None:
    (Path(folder) / NAME).write_text(json.dumps(manifest.to_json(), indent=2))


def read(folder) -> Manifest:
    """The manifest of an output folder, or one sentence saying why there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RankwiseError(f"not a folder: {folder}")
    try:
        record = json.loads((folder / NAME).read_text())
    except FileNotFoundError:
        raise RankwiseError(f"{folder} is not a rankwise output (no {NAME})") from None
    except (OSError, ValueError) as e:
        raise RankwiseError(f"{folder / NAME} is unreadable or corrupted: {e}") from None
    return Manifest.from_json(record, str(folder / NAME))
