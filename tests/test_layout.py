"""The house rules a reader relies on: every path the documentation names exists, modules
stay small, and imports point one way."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
REPO_PATH = re.compile(r"(?<![\w./~-])((?:rankwise|bench|docs|tests|scripts|\.ci)/[\w./-]*\w)")
LINK = re.compile(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)")
MAX_LINES = 450


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_the_documentation_names_exists(doc):
    text = doc.read_text()
    named = {ROOT / p for p in REPO_PATH.findall(text)}
    named |= {(doc.parent / p).resolve() for p in LINK.findall(text)}
    missing = sorted(str(p.relative_to(ROOT)) for p in named if not p.exists())
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    assert any(line.startswith("## Use") for line in lines[:40])


def _modules():
    for path in sorted((ROOT / "rankwise").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                found |= {f"{target}.{a.name}" if not node.module else target for a in node.names}
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {f for f in found if f.split(".")[0] == "rankwise"}


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_modules_stay_small(name, path):
    assert len(path.read_text().splitlines()) <= MAX_LINES, name


# what each part of the package must never import: the layers below never reach up
NEVER = {
    "rankwise.train": ("compress", "plans", "cut", "stream_cut", "solving", "entrypoints", "cli"),
    "rankwise.config": ("rounding", "pricing", "compress", "plans", "cut", "entrypoints", "cli"),
    "rankwise.pipeline": ("compress", "plans", "cut", "stream_cut", "train", "entrypoints",
                          "cli"),
    "rankwise.geometry": ("stats", "layers", "pipeline", "compress", "plans", "train"),
    "rankwise.grids": ("rounding", "pricing", "compress", "plans"),
    "rankwise.forms": ("rounding", "pricing", "compress", "plans"),
}
CORE_NEVER = ("lab",)     # the research lab beside the product; only its verbs reach it


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_point_one_way(name, path):
    forbidden = [f"rankwise.{m}" for part, mods in NEVER.items()
                 if name == part or name.startswith(part + ".") for m in mods]
    if not name.startswith(("rankwise.lab", "rankwise.cli")):
        forbidden += [f"rankwise.{m}" for m in CORE_NEVER]
    wrong = sorted(i for i in _imports(name, path)
                   if any(i == f or i.startswith(f + ".") for f in forbidden))
    assert not wrong, f"{name} imports {wrong}"
