"""Options as dataclass fields: every default and help text written once, where the field is.

A config class declares its fields with `option(...)`; the command line (rankwise.cli)
generates its flags from those fields and a YAML recipe fills the same names, so a flag,
a recipe key and an API keyword are one thing with one default. The `check_*` helpers
turn a bad value into one RankwiseError sentence naming the option and the accepted range.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from .errors import RankwiseError


def option(default=None, help: str = "", *, choices=None, required: bool = False,
           positional: bool = False, factory=None, metavar: str | None = None,
           aliases: tuple[str, ...] = ()):
    """A dataclass field carrying its command-line help. `choices` limits the values;
    `required` options have no default (the command line insists on them);
    `positional` ones are given without a flag; `aliases` are older names still accepted
    as flags and recipe keys."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
                "required": required, "positional": positional, "metavar": metavar,
                "aliases": tuple(aliases)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def fields_of(cls) -> list[tuple[dataclasses.Field, type]]:
    """The option fields of a config class with their resolved annotations."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def canonical_names(cls, values: dict) -> dict:
    """Option names with underscores, aliases replaced by the field they stand for."""
    alias = {a: f.name for f, _ in fields_of(cls) for a in f.metadata.get("aliases", ())}
    out = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        out[alias.get(key, key)] = value
    return out


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


def check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise RankwiseError(f"{name} must be {what}, got {value!r}")
    return value


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = True, high_open: bool = True) -> float:
    """A float within (low, high); the ends are open unless told otherwise."""
    span = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, " \
           f"{high if high is not None else 'inf'}{')' if high_open else ']'}"
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise RankwiseError(f"{name} must be a number in {span}, got {value!r}") from None
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above or value != value:
        raise RankwiseError(f"{name} must be in {span}, got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise RankwiseError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise RankwiseError(f"{name} must be true or false, got {value!r}")
    return value


def check_choices_of(instance) -> None:
    """Every field declared with `choices` holds one of them (None passes when optional)."""
    for f, _ in fields_of(type(instance)):
        choices = f.metadata.get("choices")
        value = getattr(instance, f.name)
        if choices and value is not None:
            for item in (value if isinstance(value, (list, tuple)) else [value]):
                check_choice(f.name.replace("_", " "), item, choices)
