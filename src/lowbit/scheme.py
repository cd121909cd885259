"""What a layer becomes: ``TensorScheme`` = weight spec + input-activation spec + sparsity spec.

A ``QuantSpec`` (``lowbit.spec``) says how a weight is stored. A layer can also quantize its
input activations at inference (``ActSpec``) and keep only part of its weights (``SparsitySpec``).
``TensorScheme`` bundles the three; every part is optional. A ``Rule`` maps a module-name regex
to a scheme (or to ``None``: leave the module alone); in a list of rules the last match wins.

All of them are frozen dataclasses validated in ``__post_init__`` and round-trip through JSON
(``to_dict`` / ``from_dict``). The string syntax (``w8a8``, ``int4:g128+a=int8:token``) is in
``lowbit.schemes``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Union

from lowbit.errors import LowbitError
from lowbit.formats.base import Format
from lowbit.formats.registry import format_from_dict
from lowbit.spec import Granularity, PerChannel, PerGroup, PerTensor, QuantSpec

SCHEME_VERSION = 1
ACT_GRANULARITIES = {"tensor": PerTensor, "token": PerChannel, "group": PerGroup}
ACT_OBSERVERS = ("minmax", "mse", "percentile")
SPARSITY_KINDS = ("unstructured", "nm", "channel")


@dataclass(frozen=True)
class ActSpec:
    """How a layer's input activations x (..., in_features) are quantized at inference.

    The activation is viewed as a (tokens, in_features) matrix, so the weight machinery applies:

    ===========  =============================  ==========================================
    granularity  scale                          matrix-view granularity
    ===========  =============================  ==========================================
    ``tensor``   one for the whole input        ``PerTensor``
    ``token``    one per token (row)            ``PerChannel``
    ``group``    one per ``group_size`` inputs  ``PerGroup(group_size)``
    ===========  =============================  ==========================================

    dynamic: scales computed from each input as it arrives; static (``dynamic=False``, per
    tensor only) uses one scale calibrated beforehand by ``observer`` ("minmax", "mse" or
    "percentile") and stored with the layer as its ``input_scale``.
    """

    format: Format
    granularity: str = "token"
    group_size: int | None = None
    dynamic: bool = True
    observer: str = "minmax"

    def __post_init__(self) -> None:
        if self.granularity not in ACT_GRANULARITIES:
            raise LowbitError(f"activation granularity {self.granularity!r} unknown; use tensor, token or group")
        fb = self.format.fixed_block
        if fb is not None and (self.granularity != "group" or self.group_size != fb):
            raise LowbitError(f"activation format {self.format.name} uses blocks of {fb}; use group size {fb}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise LowbitError("an activation group size goes with granularity 'group' (and only with it), "
                              f"not {self.granularity!r} with group size {self.group_size}")
        if self.group_size is not None and self.group_size < 1:
            raise LowbitError(f"activation group size {self.group_size} must be a positive integer")
        if not self.dynamic and self.granularity != "tensor":
            raise LowbitError(f"static activation scales are per tensor; per {self.granularity} scales are "
                              "dynamic (drop :static or use :tensor)")
        if self.observer not in ACT_OBSERVERS:
            raise LowbitError(f"activation observer {self.observer!r} unknown; use one of {', '.join(ACT_OBSERVERS)}")

    @property
    def matrix_granularity(self) -> Granularity:
        """The granularity on the (tokens, in_features) view."""
        g = ACT_GRANULARITIES[self.granularity]
        return g(self.group_size) if g is PerGroup else g()

    def quant_spec(self) -> QuantSpec:
        """The ``QuantSpec`` that rounds the (tokens, in_features) view (float32 scales)."""
        return QuantSpec(self.format, self.matrix_granularity, scale_dtype="float32")

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format.to_dict(), "granularity": self.granularity, "group_size": self.group_size,
                "dynamic": self.dynamic, "observer": self.observer}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActSpec":
        return cls(format_from_dict(d["format"]), d["granularity"], d.get("group_size"), d["dynamic"],
                   d.get("observer", "minmax"))


@dataclass(frozen=True)
class SparsitySpec:
    """Which weights are zeroed, and the mask kept beside them.

    ===============  ===================================================================
    kind             meaning
    ===============  ===================================================================
    ``unstructured``  a fraction ``ratio`` of each targeted weight is zero, anywhere
    ``nm``           in every run of ``m`` consecutive inputs of a row, ``n`` stay nonzero
                     (2:4 keeps 2 of 4: 50%)
    ``channel``      a fraction ``ratio`` of whole input channels (columns) is removed
    ===============  ===================================================================
    """

    kind: str
    ratio: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPARSITY_KINDS:
            raise LowbitError(f"sparsity kind {self.kind!r} unknown; use one of {', '.join(SPARSITY_KINDS)}")
        if self.kind == "nm":
            if self.n is None or self.m is None or not 0 < self.n < self.m or self.ratio is not None:
                raise LowbitError(f"N:M sparsity needs 0 < n < m (e.g. 2:4) and no ratio, not n={self.n} m={self.m}")
        elif self.ratio is None or not 0 < self.ratio < 1 or self.n is not None or self.m is not None:
            raise LowbitError(f"{self.kind} sparsity needs a ratio strictly between 0 and 1 (e.g. 0.5), "
                              f"not {self.ratio}")

    @property
    def zero_fraction(self) -> float:
        return 1 - self.n / self.m if self.kind == "nm" else float(self.ratio)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ratio": self.ratio, "n": self.n, "m": self.m}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparsitySpec":
        return cls(d["kind"], d.get("ratio"), d.get("n"), d.get("m"))


@dataclass(frozen=True)
class TensorScheme:
    """What one layer becomes: its stored weight, its input activations, its sparsity."""

    weight: QuantSpec | None = None
    input: ActSpec | None = None
    sparsity: SparsitySpec | None = None

    def __post_init__(self) -> None:
        if self.weight is None and self.input is None and self.sparsity is None:
            raise LowbitError("an empty scheme changes nothing; give a weight, activation or sparsity spec "
                              "(or map the rule to None to leave a layer alone)")

    def to_dict(self) -> dict[str, Any]:
        return {"version": SCHEME_VERSION,
                "weight": None if self.weight is None else self.weight.to_dict(),
                "input": None if self.input is None else self.input.to_dict(),
                "sparsity": None if self.sparsity is None else self.sparsity.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorScheme":
        if d.get("version") != SCHEME_VERSION:
            raise LowbitError(f"scheme version {d.get('version')!r} is not supported; this lowbit reads "
                              f"{SCHEME_VERSION}: upgrade lowbit")
        return cls(None if d.get("weight") is None else QuantSpec.from_dict(d["weight"]),
                   None if d.get("input") is None else ActSpec.from_dict(d["input"]),
                   None if d.get("sparsity") is None else SparsitySpec.from_dict(d["sparsity"]))


SchemeLike = Union[TensorScheme, QuantSpec]


def as_scheme(s: SchemeLike | None) -> TensorScheme | None:
    """A ``QuantSpec`` is the scheme with only a weight spec."""
    if s is None or isinstance(s, TensorScheme):
        return s
    if isinstance(s, QuantSpec):
        return TensorScheme(weight=s)
    raise LowbitError(f"a rule maps to a TensorScheme, a QuantSpec or None, not {type(s).__name__}")


@dataclass(frozen=True)
class Rule:
    """Module-name regex -> scheme; ``scheme=None`` leaves matching modules alone.

    A ``QuantSpec`` given as the scheme stands for ``TensorScheme(weight=spec)``.
    """

    pattern: str
    scheme: TensorScheme | None = field(default=None)

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise LowbitError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None
        object.__setattr__(self, "scheme", as_scheme(self.scheme))

    @property
    def spec(self) -> QuantSpec | None:
        """The weight spec of the scheme (None when the rule leaves weights alone)."""
        return None if self.scheme is None else self.scheme.weight

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "scheme": None if self.scheme is None else self.scheme.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rule":
        return cls(d["pattern"], None if d.get("scheme") is None else TensorScheme.from_dict(d["scheme"]))


def resolve(rules: list[Rule], name: str) -> TensorScheme | None:
    """The scheme for module ``name``: the last matching rule wins."""
    scheme = None
    for rule in rules:
        if rule.matches(name):
            scheme = rule.scheme
    return scheme
