"""What a tensor becomes: frozen, validated, JSON round-trippable specs.

A ``QuantSpec`` says *what* (format, granularity, scale storage, scale search), never *how* a
weight is calibrated; algorithms take a spec and a weight. ``lowbit.scheme`` builds on it: a
layer's ``TensorScheme`` (weight, input activations, sparsity) and the ``Rule`` that maps names to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from lowbit.errors import LowbitError
from lowbit.formats.base import Format
from lowbit.formats.registry import format_from_dict

SPEC_VERSION = 1


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole (rows, cols) matrix view."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per output row."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive input columns of a row.

    When ``size`` does not divide the column count the last group of each row is partial
    (576 columns at size 128 give groups of 128, 128, 128, 128 and 64), as in GPTQ's code.
    """

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise LowbitError(f"group size {self.size} must be a positive integer")


@dataclass(frozen=True)
class PerBlock:
    """One scale per ``rows × cols`` tile; edge tiles may be partial."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise LowbitError(f"block {self.rows}x{self.cols} must have positive sides")


Granularity = Union[PerTensor, PerChannel, PerGroup, PerBlock]
_GRANULARITIES = {c.__name__: c for c in (PerTensor, PerChannel, PerGroup, PerBlock)}
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def search_norm(scale_search: str) -> float | None:
    """The error norm p of a scale search: None for "minmax" and "hqq", 2 for "mse", P for "lpP"."""
    if scale_search in ("minmax", "hqq"):
        return None
    if scale_search == "mse":
        return 2.0
    m = re.fullmatch(r"lp(\d+(?:\.\d+)?)", scale_search)
    if m is None or float(m.group(1)) <= 0:
        raise LowbitError(f"scale_search {scale_search!r} unknown; use minmax, mse, hqq or lpP with P > 0 (e.g. lp3)")
    return float(m.group(1))


def tile_of(g: Granularity, rows: int, cols: int) -> tuple[int, int]:
    """The (tile_rows, tile_cols) that ``g`` means for a (rows, cols) matrix."""
    if isinstance(g, PerTensor):
        return rows, cols
    if isinstance(g, PerChannel):
        return 1, cols
    if isinstance(g, PerGroup):
        return 1, g.size
    return g.rows, g.cols


@dataclass(frozen=True)
class QuantSpec:
    """format × granularity × scale storage × scale search.

    scale_dtype: storage of scales and float zeros ("float16", "bfloat16" or "float32"); formats
    with a dictated scale encoding (MX's e8m0, NVFP4's e4m3) ignore it.
    scale_search: "minmax" (cover each block's range), "mse" (per block, the clipping ratio with
    the least squared error), "lpP" (the same with the error norm ``sum |err|^P``, e.g. lp3) or
    "hqq" (min-max scale, float zero refined by HQQ's half-quadratic solver; float-zero formats).
    """

    format: Format
    granularity: Granularity = field(default_factory=PerChannel)
    scale_dtype: str = "float16"
    scale_search: str = "minmax"

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"scale_dtype {self.scale_dtype!r} unknown; use one of {sorted(SCALE_DTYPES)}")
        search_norm(self.scale_search)  # validates
        if self.scale_search == "hqq" and self.format.zero_kind != "float":
            raise LowbitError(f"scale search hqq refines a float zero; {self.format.name} has none, "
                              "use a float-zero format such as uint4_fz (or mse)")
        fb = self.format.fixed_block
        if fb is not None and self.granularity != PerGroup(fb):
            raise LowbitError(f"format {self.format.name} uses blocks of {fb}; use PerGroup({fb})")

    def to_dict(self) -> dict[str, Any]:
        g = self.granularity
        return {
            "version": SPEC_VERSION,
            "format": self.format.to_dict(),
            "granularity": {"kind": type(g).__name__, **g.__dict__},
            "scale_dtype": self.scale_dtype,
            "scale_search": self.scale_search,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        if d.get("version") != SPEC_VERSION:
            raise LowbitError(f"spec version {d.get('version')!r} is not supported; this lowbit reads {SPEC_VERSION}")
        g = dict(d["granularity"])
        kind = _GRANULARITIES.get(g.pop("kind", ""))
        if kind is None:
            raise LowbitError(f"unknown granularity {d['granularity']!r}")
        return cls(format_from_dict(d["format"]), kind(**g), d["scale_dtype"], d["scale_search"])
