"""Every format by name: the named formats (``get_format("int4")``) and the families that a saved
spec's ``"family"`` names (``format_from_dict``).

A family module defines its ``Format`` subclasses and a ``PRESETS`` tuple of its named formats,
and knows nothing of this registry; a new family is one import and its entries below.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats.base import Format
from lowbit.formats.binary import PRESETS as BINARY_PRESETS
from lowbit.formats.binary import BinaryFormat, TernaryFormat
from lowbit.formats.float import PRESETS as FLOAT_PRESETS
from lowbit.formats.float import FloatFormat
from lowbit.formats.grid import PRESETS as GRID_PRESETS
from lowbit.formats.grid import CodebookFormat, PowerFormat
from lowbit.formats.int import PRESETS as INT_PRESETS
from lowbit.formats.int import IntFormat
from lowbit.formats.micro import PRESETS as MICRO_PRESETS
from lowbit.formats.micro import MXFormat, NVFP4Format

#: family name (``Format.family``, the ``"family"`` of a saved spec) -> its class
FAMILIES: dict[str, type[Format]] = {cls.family: cls for cls in (
    IntFormat, FloatFormat, CodebookFormat, PowerFormat, MXFormat, NVFP4Format, BinaryFormat, TernaryFormat)}

_PRESETS: dict[str, Format] = {
    fmt.name: fmt for fmt in (*INT_PRESETS, *FLOAT_PRESETS, *GRID_PRESETS, *MICRO_PRESETS, *BINARY_PRESETS)}


def register_preset(fmt: Format, name: str | None = None) -> Format:
    """Make ``fmt`` available by name (``get_format``) and to the conformance suite; a family of
    your own is registered with its first preset, so that saved specs of it load back."""
    cls = FAMILIES.setdefault(fmt.family, type(fmt))
    if cls is not type(fmt):
        raise LowbitError(f"format family {fmt.family!r} is {cls.__name__} already; give {type(fmt).__name__} "
                          "a family name of its own")
    _PRESETS[name or fmt.name] = fmt
    return fmt


def all_formats() -> dict[str, Format]:
    """Every named format, in the order of ``FAMILIES``' modules (what ``lowbit formats`` lists)."""
    return dict(_PRESETS)


def get_format(name: str) -> Format:
    """The named format ``name`` (``"int4"``, ``"fp8_e4m3fn"``, ``"nf4"``, ``"mxfp4"``, ...)."""
    if name not in _PRESETS:
        raise LowbitError(f"unknown format {name!r}; known formats: {', '.join(sorted(_PRESETS))}")
    return _PRESETS[name]


def format_from_dict(d: dict[str, Any]) -> Format:
    """Rebuild a format from ``to_dict`` output; only registered families and their fields.

    A dict written by an older lowbit keeps its old meaning (``Format.upgrade_dict``).
    """
    d = dict(d)
    family = d.pop("family", None)
    cls = FAMILIES.get(family or "")
    if cls is None:
        raise LowbitError(f"unknown format family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    d = cls.upgrade_dict(d)
    allowed = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(d) - allowed
    if unknown:
        raise LowbitError(f"format {family!r} has no fields {sorted(unknown)}; allowed: {sorted(allowed)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
