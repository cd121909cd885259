"""Method options on the command line, read from each method's own dataclass fields.

``--damp 0.01``, ``--damp=0.01``, ``--act-order`` / ``--no-act-order`` (booleans) set the
field of the same name (dashes for underscores) of every method in ``--method a+b`` that has
one; the value is converted to the field's type. ``cli_quantize`` never names a method.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lowbit.errors import LowbitError
from lowbit.modifiers import modifier_class
from lowbit.modifiers.base import option_fields


def method_fields(methods: list[str]) -> dict[str, dataclasses.Field]:
    """Field name -> field, over the option fields of every method named."""
    out: dict[str, dataclasses.Field] = {}
    for name in methods:
        for f in option_fields(modifier_class(name)):
            out.setdefault(f.name, f)
    return out


def parse_options(args: list[str], methods: list[str]) -> dict[str, Any]:
    """Extra command-line words -> {field: value} for the methods named (raises on anything else)."""
    fields = method_fields(methods)
    known = ", ".join(f"--{n.replace('_', '-')}" for n in fields) or "none"
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--"):
            raise LowbitError(f"unexpected argument {word!r}; method options are written --name VALUE")
        name, eq, value = word[2:].partition("=")
        negated = name.startswith("no-") and name[3:].replace("-", "_") in fields
        key = (name[3:] if negated else name).replace("-", "_")
        if key not in fields:
            raise LowbitError(f"no such option {word.split('=')[0]} for method {'+'.join(methods)}; "
                              f"its options: {known}")
        kind = _kind(fields[key])
        if kind is bool:
            if eq:
                raise LowbitError(f"{word}: a switch takes no value; write --{name} or --no-{name}")
            out[key] = not negated
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise LowbitError(f"--{name} needs a value")
            value, i = args[i + 1], i + 1
        out[key] = _convert(value, kind, name)
        i += 1
    return out


def _kind(f: dataclasses.Field) -> type:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for kind in (bool, int, float, str):
        if text.split("|")[0].strip() == kind.__name__:
            return kind
    raise LowbitError(f"option {f.name} has a type the command line cannot give ({text}); set it in a recipe")


def _convert(value: str, kind: type, name: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise LowbitError(f"--{name} {value!r} is not a valid {kind.__name__}") from None


def describe_options(method: str) -> list[tuple[str, str, str]]:
    """(flag, type, default) of each option of ``method``, for ``lowbit methods``."""
    rows = []
    for f in option_fields(modifier_class(method)):
        flag = f"--{f.name.replace('_', '-')}"
        kind = _kind(f)
        if kind is bool:
            flag += f"/--no-{f.name.replace('_', '-')}"
        default = f.default if f.default is not dataclasses.MISSING else "required"
        rows.append((flag, kind.__name__, str(default)))
    return rows
