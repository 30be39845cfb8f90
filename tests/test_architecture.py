"""The layout rules of ARCHITECTURE.md that code can check: no import cycles, megalm never imports launcher/,
functions stay under 60 lines outside kernels/. Read from the source with ast (imports inside functions count:
an import moved into a function to dodge a cycle is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("megalm", "kernels", "launcher")
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it: `from a.b import c` counts as a.b.c when that is a
    module, else as a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = sources()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if colour.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in colour and (cycle := visit(n)):
                return cycle
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if m not in colour and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_none_where_there_is_none():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "megalm.training.loop" in graph and "megalm.model.transformer" in graph["megalm.training.loop"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_megalm_never_imports_launcher():
    offenders = {m: sorted(i for i in deps if i.split(".")[0] == "launcher")
                 for m, deps in import_graph().items() if m.split(".")[0] == "megalm"}  # fmt: skip
    assert not {m: d for m, d in offenders.items() if d}, "launcher/ is a thin layer over megalm, not a dependency"


@pytest.mark.parametrize("package", ["megalm", "launcher", "bench"])
def test_functions_stay_under_60_lines(package):
    long = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 60 lines (give a step its own name): " + "; ".join(long)
