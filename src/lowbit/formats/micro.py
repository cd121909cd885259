"""Microscaling block formats: OCP MX v1.0 (blocks of 32, e8m0 scales) and NVFP4.

MX (OCP Microscaling Formats v1.0, §5-6). Per block of 32 the shared scale is the power of two

    X = 2^(floor(log2(amax · clip)) − emax_elem),   exponent clamped to [-127, 127]

where ``emax_elem`` is the exponent of the element format's largest normal:

==========  ========  ================  =========
preset      element   element max       emax_elem
==========  ========  ================  =========
mxfp8_e4m3  e4m3fn    448               8
mxfp8_e5m2  e5m2      57344             15
mxfp6_e3m2  e3m2      28                4
mxfp6_e2m3  e2m3      7.5               2
mxfp4       e2m1      6                 2
mxint8      int8      127/64            0
==========  ========  ================  =========

An all-zero block gets ``X = 2^-127`` (e8m0 code 0). ``clip < 1`` shrinks ``amax`` before the
exponent is taken, which can lower X by one power of two (guess: the spec has no clipping).
Elements ``x / X`` are rounded to the element grid to nearest, ties to even, saturating at the
element max (as the microxcaling reference does for MX; note its default rounding mode breaks
ties away from zero, the spec's conversion is RNE). MXINT8 elements are two's-complement int8
codes ``k`` meaning ``k/64``; like microxcaling we use the symmetric range ``k ∈ [-127, 127]``,
so ``-128`` (code 0x80, value -2) is never produced and is NaN in ``values()``.

NVFP4 (NVIDIA, blocks of 16): e2m1 elements, an fp8 e4m3 block scale and an fp32 tensor scale
``g = amax(tensor) / (448·6)``; the block scale is ``(amax_block·clip/6)/g`` rounded to e4m3
(saturated at 448, at least 2^-9 for a nonzero block). ``QParams.scale`` holds the e4m3 value
itself (without ``g``), and ``x̂ = value[code] · (scale · g)``. Called without a global scale,
``choose_qparams`` uses the blocks' own (our choice) and returns it in ``QParams.global_scale``.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import floor, log2
from typing import ClassVar

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams, ScaleRounding, absmax, rounded, safe_scale
from lowbit.formats.float import FloatFormat

_FLOAT_ELEMENTS = {
    "e4m3": FloatFormat(4, 3, special="fn"),
    "e5m2": FloatFormat(5, 2, special="ieee"),
    "e3m2": FloatFormat(3, 2),
    "e2m3": FloatFormat(2, 3),
    "e2m1": FloatFormat(2, 1),
}
ELEMENTS = (*_FLOAT_ELEMENTS, "int8")
_NAMES = {"e4m3": "mxfp8_e4m3", "e5m2": "mxfp8_e5m2", "e3m2": "mxfp6_e3m2",
          "e2m3": "mxfp6_e2m3", "e2m1": "mxfp4", "int8": "mxint8"}


def int8_element_values() -> Tensor:
    """MXINT8 element table: two's-complement code ``c`` means ``int8(c) / 64``; -128 unused."""
    k = torch.arange(256, dtype=torch.float64)
    v = torch.where(k >= 128, k - 256, k) / 64
    v[128] = float("nan")
    return v


def shared_exponent(amax: Tensor, emax_elem: int) -> Tensor:
    """(n, 1) block amax -> (n, 1) float32 ``floor(log2(amax)) - emax_elem`` clamped to ±127.

    ``frexp`` gives the exact ``floor(log2)`` (``log2`` can round up just below a power of two);
    an all-zero block gets -127.
    """
    _, e = torch.frexp(amax.to(torch.float32))  # amax = m·2^e, m in [0.5, 1)
    exp = (e - 1 - emax_elem).clamp(-127, 127)
    return torch.where(amax > 0, exp, torch.full_like(exp, -127)).to(torch.float32)


@dataclass(frozen=True)
class MXFormat(Format):
    """OCP MX format with ``element`` in e4m3, e5m2, e3m2, e2m3, e2m1, int8."""

    family = "mx"
    fixed_block: ClassVar[int] = 32
    scale_storage: ClassVar[str] = "e8m0"
    element: str = "e2m1"

    def __post_init__(self) -> None:
        if self.element not in ELEMENTS:
            raise LowbitError(f"MX element {self.element!r} is not allowed; use one of {ELEMENTS}")

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 8 if self.element == "int8" else _FLOAT_ELEMENTS[self.element].bits

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return True

    @property
    def name(self) -> str:
        return _NAMES[self.element]

    @property
    def emax_elem(self) -> int:
        """Exponent of the element format's largest normal, ``floor(log2(max))``."""
        return floor(log2(self.max))

    def values(self) -> Tensor:
        if self.element == "int8":
            return int8_element_values()
        return _FLOAT_ELEMENTS[self.element].values()

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        exp = shared_exponent(absmax(blocks) * clip, self.emax_elem)
        return QParams(scale=rounded(torch.exp2(exp), round_scale))  # exact powers of two, 2^-127 .. 2^127

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        return self.nearest(blocks / safe_scale(qp.scale))

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        return self.lookup(codes) * qp.scale


_E4M3_MAX = 448.0
_E4M3_MIN_SUBNORMAL = 2.0**-9
_E2M1 = FloatFormat(2, 1)


@dataclass(frozen=True)
class NVFP4Format(Format):
    """NVFP4: e2m1 elements, blocks of 16, e4m3 block scales, an fp32 tensor scale."""

    family = "nvfp4"
    fixed_block: ClassVar[int] = 16
    scale_storage: ClassVar[str] = "float8_e4m3fn"

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 4

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return True

    @property
    def name(self) -> str:
        return "nvfp4"

    def values(self) -> Tensor:
        return _E2M1.values()

    def global_scale(self, x: Tensor) -> Tensor:
        """() float32 ``amax(x) / (448·6)``; 1.0 for an all-zero tensor."""
        g = x.detach().abs().amax().to(torch.float32) / (_E4M3_MAX * 6.0)
        return torch.where(g > 0, g, torch.ones_like(g))

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        """Without ``global_scale`` the blocks' own tensor scale is used (and returned)."""
        g = self.global_scale(blocks) if global_scale is None else global_scale
        amax = absmax(blocks)
        s = (amax * clip / 6.0 / g).clamp(max=_E4M3_MAX)
        s = torch.where(amax > 0, s.clamp(min=_E4M3_MIN_SUBNORMAL), torch.zeros_like(s))
        return QParams(scale=rounded(s.to(torch.float8_e4m3fn).to(torch.float32), round_scale), global_scale=g)

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        s = qp.scale if qp.global_scale is None else qp.scale * qp.global_scale
        return self.nearest(blocks / safe_scale(s))

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        s = qp.scale if qp.global_scale is None else qp.scale * qp.global_scale
        return self.lookup(codes) * s


#: the named formats of this family, in the order ``lowbit formats`` lists them
PRESETS = (*(MXFormat(e) for e in ELEMENTS), NVFP4Format())
