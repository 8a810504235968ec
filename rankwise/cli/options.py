"""Command-line options generated from config dataclasses, merged with a YAML recipe.

Every flag has default None, so that "not given" is visible: a value is the flag's if it was
given, else the recipe's if it holds the name, else the dataclass field's default. One
source of every default, and a recipe can never be overridden by a flag nobody typed.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..errors import RankwiseError
from ..options import canonical_names, default_of, fields_of, read_yaml


def _base(hint) -> tuple[type, bool]:
    """(the type inside an optional annotation, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _mapping(text: str) -> dict:
    import yaml
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{q_proj: 16}}', got {text!r}")
    return value


def _help(f: dataclasses.Field) -> str:
    text, default = f.metadata.get("help", ""), default_of(f)
    if not (default is None or default is False or default in ({}, []) or f.metadata.get("required")):
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default {shown})"
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, classes) -> None:
    """One argument per field of every class (flags --name-with-dashes; positional fields
    by name), and --config for a YAML recipe of the same names."""
    for cls in classes:
        for f, hint in fields_of(cls):
            base, _ = _base(hint)
            kw = {"default": None, "help": _help(f)}
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
            origin = typing.get_origin(base)
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif origin is list:
                kw.update(nargs="+", type=typing.get_args(base)[0])
            elif origin is dict:
                kw["type"] = _mapping
            else:
                kw["type"] = base
            if f.metadata.get("choices") and base is not bool:
                kw["choices"] = f.metadata["choices"]
            if f.metadata.get("positional"):
                kw["nargs"] = "*" if kw.get("nargs") == "+" else "?"
                parser.add_argument(f.name, **kw)
            else:
                flags = [f.name, *f.metadata.get("aliases", ())]
                parser.add_argument(*("--" + n.replace("_", "-") for n in flags), dest=f.name, **kw)
    parser.add_argument("--config", metavar="YAML",
                        help="recipe file holding any of these options by name; options "
                             "given on the command line win")


def resolved_values(args: argparse.Namespace, classes) -> dict:
    """Each field's value: flag if given, else recipe, else (absent) the field default."""
    values = read_yaml(args.config) if getattr(args, "config", None) else {}
    for cls in classes:
        values = canonical_names(cls, values)
    known = {f.name for cls in classes for f, _ in fields_of(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise RankwiseError(f"unknown option(s) {unknown} in {args.config}; accepted: "
                            f"{sorted(known)}")
    for name in known:
        given = getattr(args, name, None)
        if given is not None and given != []:     # an empty positional list: not given
            values[name] = given
    return values


def build_configs(args: argparse.Namespace, classes) -> dict[type, object]:
    """The config objects of a verb (validated at construction)."""
    values = resolved_values(args, classes)
    configs = {}
    for cls in classes:
        mine = {}
        for f, _ in fields_of(cls):
            if f.name in values:
                mine[f.name] = values[f.name]
            elif f.metadata.get("required"):
                flag = f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
                raise RankwiseError(f"{flag} is required (on the command line or in --config)")
        configs[cls] = cls(**mine)
    return configs
