"""`rankwise <verb>`: thin layers over the API entrypoints, one module per verb.

A verb module has DESCRIPTION, option_classes() (its config dataclasses, whose fields
become its flags and recipe keys) and run(configs). Only the verb being run is imported,
so `rankwise compress` never loads the research lab. Bad input ends in one sentence and
exit status 2; Ctrl-C in one line and exit status 130.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import RankwiseError
from .options import add_options, build_configs

log = logging.getLogger("rankwise")

VERBS = {   # verb: (module, one-line help)
    "compress": ("compress", "factorize a model's linear layers and save it"),
    "eval": ("evaluate", "perplexity and divergence from the dense model"),
    "finetune": ("finetune", "fine-tune under a rank constraint (factors, hard, svt)"),
    "heal": ("heal", "distil a compressed model back toward its dense teacher"),
    "quantize": ("quantize", "round a rankwise output, or fit it to a budget in bits"),
    "export": ("export", "write a rankwise output in another format (dense, lora)"),
    "report": ("report", "one HTML page comparing runs"),
    "dln": ("dln", "deep linear networks vs their compressed form (C-DLN; research lab)"),
    "images": ("images", "fine-tune an image MLP under a rank constraint (research lab)"),
}


def verb_module(verb: str):
    return importlib.import_module(f"{__name__}.{VERBS[verb][0]}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the options of the verb named in argv (the others listed only)."""
    parser = argparse.ArgumentParser(prog="rankwise", description="Low-rank factorization of "
                                     "trained networks, chosen with information geometry.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for verb, (_, help) in VERBS.items():
        if verb == chosen:
            module = verb_module(verb)
            add_options(sub.add_parser(verb, help=help, description=module.DESCRIPTION),
                        module.option_classes())
        else:
            sub.add_parser(verb, help=help)
    return parser


def parse(argv: list[str]) -> tuple[str, dict[type, object], argparse.Namespace]:
    """(verb, its validated config objects, the raw namespace): everything that can be
    checked without loading a model."""
    args = build_parser(argv).parse_args(argv)
    return args.command, build_configs(args, verb_module(args.command).option_classes()), args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        verb, configs, args = parse(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        import torch

        from ..pipeline.distributed import init_from_env
        torch.manual_seed(0)
        if init_from_env()[0] > 0:         # under torchrun only rank 0 speaks
            logging.getLogger().setLevel(logging.WARNING)
            sys.stdout = open(os.devnull, "w")
        verb_module(verb).run(configs)
    except RankwiseError as e:
        print(f"rankwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rankwise: interrupted", file=sys.stderr)
        return 130
    return 0
