"""The library's imports point one way: core <- tasks, models <- discovery <- pipeline <- studies <- plots, cli.

Every import of a circuitlib module, at module level or inside a function, is read from the source
(ast), so a lazy import cannot hide an arrow back up. The book's own code (notebooks/booklib) may
import the library; the library never imports it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "circuitlib"

# lower number = lower floor; a module may import its own floor and the floors below
FLOORS = {
    "version": 0,
    "core": 0,
    "tasks": 1,
    "models": 1,
    "discovery": 2,
    "pipeline": 3,
    "studies": 4,
    "plots": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The circuitlib modules `path` imports (absolute or relative, anywhere in the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("circuitlib", "booklib")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] in ("circuitlib", "booklib"):
                found.add(target)
                found |= {
                    f"{target}.{a.name}"
                    for a in node.names
                    if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                }
    return found - {name}


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS["__init__"] if len(parts) == 1 else FLOORS[parts[1]]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_floor():
    assert all(len(module_name(p).split(".")) == 1 or module_name(p).split(".")[1] in FLOORS for p in MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    me = module_name(path)
    up = [
        m for m in imported(path) if m.startswith("circuitlib") and floor(m) > floor(me) and m != "circuitlib.version"
    ]
    book = [m for m in imported(path) if m.startswith("booklib")]
    assert not up, f"{me} (floor {floor(me)}) imports a higher floor: {up}"
    assert not book, f"{me} imports the book's code: {book}"


def test_no_import_cycle():
    """No module reaches itself through the imports of the library (package __init__ files aside, which
    Python runs before any module of their package)."""
    graph = {module_name(p): {m for m in imported(p) if m.startswith("circuitlib.")} for p in MODULES}
    graph = {
        k: {m for m in v if m in graph and not (PACKAGE / "/".join(m.split(".")[1:]) / "__init__.py").exists()}
        for k, v in graph.items()
    }
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in graph:
        if start not in state:
            visit(start, [start])


def test_the_arrow_test_can_fail(tmp_path):
    """A core module importing the studies layer is caught (the check is not vacuous)."""
    bad = PACKAGE / "core" / "_probe_upward.py"
    bad.write_text("def f():\n    from circuitlib.studies.runner import run_study\n")
    try:
        with pytest.raises(AssertionError, match="higher floor"):
            test_imports_point_down(bad)
    finally:
        bad.unlink()


def test_public_api_resolves():
    import circuitlib as cl

    missing = [name for name in cl.__all__ if getattr(cl, name, None) is None]
    assert not missing
    assert {"load_model", "get_task", "extract", "prune"} <= set(cl.__all__)
