"""Write the shipped off-domain texts (rankwise/data/{pydoc,code}.{calib,eval}.txt) from
what a Python install already has: the standard library's documentation topics
(pydoc_data.topics) and standard library source files. Each domain is split into a
calibration part and an evaluation part that share no topic and no file.

    python scripts/make_domain_texts.py     # writes the files; run once, commit them
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "rankwise" / "data"

# whole modules, alphabetically interleaved between the parts; nothing generated, no tests
CODE_CALIB = ["argparse.py", "dataclasses.py", "difflib.py", "fractions.py", "functools.py",
              "heapq.py", "pathlib.py", "statistics.py", "textwrap.py", "json/decoder.py",
              "json/encoder.py", "collections/__init__.py", "gettext.py", "shlex.py"]
CODE_EVAL = ["bisect.py", "calendar.py", "csv.py", "shutil.py", "string.py", "tempfile.py"]


def pydoc_parts() -> tuple[str, str]:
    """Every third topic is evaluation; topics repeat whole sections of each other, so a
    paragraph is kept only in the first topic (by name) that holds it."""
    from pydoc_data.topics import topics
    seen, parts = set(), []
    for name in sorted(topics):
        kept = [p for p in topics[name].split("\n\n") if p.strip() and p not in seen]
        seen.update(kept)
        parts.append("\n\n".join(kept))
    calib = [t for i, t in enumerate(parts) if i % 3 != 2 and t]
    evaluation = [t for i, t in enumerate(parts) if i % 3 == 2 and t]
    return "\n\n".join(calib), "\n\n".join(evaluation)


def code_parts() -> tuple[str, str]:
    lib = Path(sysconfig.get_paths()["stdlib"])

    def read(names):
        return "\n\n".join(f"# file: {n}\n" + (lib / n).read_text(encoding="utf-8") for n in names)
    return read(CODE_CALIB), read(CODE_EVAL)


def main() -> None:
    version = ".".join(map(str, sys.version_info[:3]))
    for domain, (calib, evaluation) in (("pydoc", pydoc_parts()), ("code", code_parts())):
        (DATA / f"{domain}.calib.txt").write_text(calib, encoding="utf-8")
        (DATA / f"{domain}.eval.txt").write_text(evaluation, encoding="utf-8")
        print(f"{domain}: calibration {len(calib):,} characters, evaluation "
              f"{len(evaluation):,} (Python {version})")


if __name__ == "__main__":
    main()
