"""No import cycle through the storage and inference modules, counting imports inside functions
(a lazy import hides a cycle from Python, not from this test)."""
from __future__ import annotations

import ast
from pathlib import Path

import lowbit

SRC = Path(lowbit.__file__).parent.parent
OWNED = ("lowbit.io", "lowbit.manifest", "lowbit.qtensor", "lowbit.nn.reference", "lowbit.report", "lowbit.hf.", "lowbit.nn",
         "lowbit.export")


def import_graph() -> dict[str, set[str]]:
    """module -> lowbit modules it imports anywhere in its body (top level or inside functions)."""
    files = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (SRC / "lowbit").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, f in files.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit"):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in files and n not in (m, "lowbit")}
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


def test_storage_and_inference_modules_sit_on_no_cycle():
    graph = import_graph()
    cyclic = sorted(m for m in graph if m.startswith(OWNED) and any(reaches(graph, d, m) for d in graph[m]))
    assert cyclic == []


def test_the_two_cycles_review_found_are_gone():
    graph = import_graph()
    assert not (reaches(graph, "lowbit.io", "lowbit.hf.quantizer") and reaches(graph, "lowbit.hf.quantizer", "lowbit.io"))
    assert "lowbit.apply" not in graph  # attach and quantized_tensors live in lowbit.nn.reference
