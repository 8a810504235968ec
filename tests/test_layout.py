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
        if path.parent.name == "texts":
            continue
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


# the rooms, bottom up: a module imports its own room and the rooms below it, never above
ROOMS = [
    {"errors", "version", "options"},            # the root's leaves
    {"geometry"}, {"models"}, {"statistics", "forms"}, {"data", "formats"}, {"pipeline"},
    {"serving"}, {"train"}, {"evaluation"}, {"cut"}, {"lab"}, {"entrypoints"}, {"cli"},
]
LEVEL = {room: level for level, rooms in enumerate(ROOMS) for room in rooms}
ROOT_MODULES = {"__init__", "__main__", "errors", "version", "options"}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("name,path", list(_modules()), ids=lambda x: x if isinstance(x, str) else "")
def test_imports_point_one_way(name, path):
    room = _room(name)
    if room in ("__init__", "__main__"):        # the public face may reach anything
        return
    assert room in LEVEL, f"{name} is in no room test_layout knows"
    wrong = sorted(i for i in _imports(name, path)
                   if _room(i) != room and LEVEL.get(_room(i), -1) > LEVEL[room]
                   or room != "cli" and _room(i) == "lab" != room)
    assert not wrong, f"{name} imports {wrong}"


def test_the_package_root_is_its_public_face():
    root = {p.stem for p in (ROOT / "rankwise").glob("*.py")}
    assert root <= ROOT_MODULES and len(root) <= 8, sorted(root - ROOT_MODULES)


def _code_lines(pattern: str) -> list[str]:
    found = []
    for name, path in _modules():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line.split("#")[0]):
                found.append(f"{name}:{number}")
    return found


def test_whether_a_run_is_in_bits_is_decided_in_one_place():
    """The budget is an object chosen once (rankwise.cut.budget); a second line may tell the
    two apart where a verb takes one budget or a width (rankwise quantize)."""
    assert len(_code_lines(r"\bbits is (not )?None")) <= 2, _code_lines(r"\bbits is (not )?None")


def test_a_form_is_named_only_where_it_is_defined():
    """Each form's name is a literal in its kind (rankwise.forms.kinds), the standalone
    modeling file and the serving plugin, nowhere else."""
    from rankwise.forms.registry import KINDS
    allowed = {"rankwise.forms.kinds", "rankwise.formats.modeling", "rankwise.serving.vllm_model"}
    for kind in KINDS:
        if kind == "dense":           # a word the targeted parameters' count uses too
            continue
        named = {line.split(":")[0] for line in _code_lines(rf"[\"']{kind}[\"']")}
        assert named <= allowed, (kind, named - allowed)
