"""The README's map of the code ("## Code layout") names every module of src/lowbit, and nothing else.

Methods are the exception: a method is one file under ``modifiers/`` (and maybe its pure function
under ``algorithms/``) plus a registry line, and adding one must not mean editing the README, so
files in those two folders may be left off the map (``lowbit methods`` lists the methods)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "lowbit"


def tree() -> set[str]:
    """Every module as the map names it: ``pkg/mod.py``; a package by its folder, ``pkg/``."""
    out = set()
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC).as_posix()
        out.add(rel.removesuffix("__init__.py") if "/" in rel and f.name == "__init__.py" else rel)
    return out


def mapped() -> list[str]:
    """The paths in the first column of the tables under "## Code layout", in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Code layout\n", 1)[1].split("\n## ", 1)[0]
    cells = [m.group(1) for m in re.finditer(r"^\| *([^|]*?) *\|", section, re.M)]
    return [p for cell in cells for p in re.findall(r"`([^`]+)`", cell)]


def test_every_module_is_on_the_map_once():
    names = mapped()
    methods = {n for n in tree() if n.startswith(("modifiers/", "algorithms/")) and not n.endswith("/")}
    assert sorted(tree() - methods - set(names)) == [], "modules missing from the README's map of the code"
    assert sorted(set(names) - tree()) == [], "the README's map names files that do not exist"
    assert sorted({n for n in names if names.count(n) > 1}) == []
