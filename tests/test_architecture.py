"""The shape of the code: no import cycles between the project's modules (function-level imports
included), and no module much longer than one sitting's reading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ablations", "analysis")
MAX_LINES = 400


def project_modules() -> dict[str, Path]:
    """{dotted name: file} for every module of the packages (`__init__` named as the package)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported(tree: ast.AST, module: str, known: set[str]) -> set[str]:
    """The project modules `module` imports anywhere in its source: at the top, in functions, under
    `if TYPE_CHECKING:`. `from package import name` counts as importing `package.name` when that is a
    module, and as importing `package` otherwise."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parent = module.split(".")[:-node.level]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` imports a.b.c, or the deepest module it names
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported(ast.parse(path.read_text(), str(path)), name, known)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "ablations.spec" in graph and graph["ablations.spec"], "the graph found no imports at all"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_sees_function_level_imports(tmp_path):
    """A cycle through an import inside a function is still a cycle."""
    known = {"p.a", "p.b"}
    a = ast.parse("def f():\n    from p import b\n")
    b = ast.parse("from p.a import thing\n")
    graph = {"p.a": imported(a, "p.a", known), "p.b": imported(b, "p.b", known)}
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None


@pytest.mark.parametrize("name", sorted(project_modules()))
def test_no_module_is_much_over_400_lines(name):
    lines = project_modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name}: {lines} lines; split it by concern"
