"""No import cycle anywhere in the lowbit package, counting imports inside functions (a lazy
import hides a cycle from Python, not from this test) and the package itself: a submodule that
imports ``lowbit`` (or takes a name from a package's ``__init__``) while that ``__init__`` imports
it back is on a cycle too."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import lowbit

SRC = Path(lowbit.__file__).parent.parent
MODULE = re.compile(r"lowbit(\.\w+)+(:\w+)?")


def import_graph() -> dict[str, set[str]]:
    """module -> lowbit modules it imports anywhere in its body (top level or inside functions).

    ``from P import N`` is an edge to ``P`` and, where ``P.N`` is a module, to ``P.N`` as well. A
    string that names a module (``"lowbit.modifiers.gptq:GPTQ"`` in a registry) is an edge too:
    ``importlib`` imports it as surely as an import statement.
    """
    files = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (SRC / "lowbit").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit"):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE.fullmatch(node.value):
                names = [node.value.partition(":")[0]]
            else:
                continue
            graph[m] |= {n for n in names if n in files and n != m}
    return graph


def path_between(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """The shortest import path start -> ... -> goal (both included), or None."""
    parent: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        nxt = []
        for m in todo:
            for d in sorted(graph[m]):
                if d == goal:
                    path = [d, m]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])  # type: ignore[arg-type]
                    return path[::-1]
                if d not in parent:
                    parent[d] = m
                    nxt.append(d)
        todo = nxt
    return None


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One shortest cycle through each module that is on any, as ``a -> b -> a``; one per set of
    modules (two modules on the same loop give it once)."""
    found: dict[frozenset[str], str] = {}
    for m in sorted(graph):
        path = path_between(graph, m, m)
        if path is not None:
            found.setdefault(frozenset(path), " -> ".join(path))
    return sorted(found.values())


def test_the_lowbit_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(found)


def test_no_module_imports_the_package_face():
    """Modules import what they use from the module that defines it: ``lowbit/__init__.py`` is the
    public face for users, and it imports the modules, never the other way round."""
    readers = sorted(m for m, deps in import_graph().items() if "lowbit" in deps)
    assert not readers, f"these modules import the package lowbit itself: {readers}"


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == ["a -> b -> c -> a"]
