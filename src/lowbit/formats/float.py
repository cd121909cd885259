"""Minifloats ``ExMy``: sign, ``exp`` exponent bits, ``man`` mantissa bits, 2 to 8 bits in all.

Code layout (sign-magnitude, as in OCP FP8/FP6/FP4): ``code = sign << (e+m) | E << m | M``.

=========  =====================================  ==========================================
E          value                                  note
=========  =====================================  ==========================================
0          ``(-1)^s · 2^(1-bias) · M / 2^m``      subnormals (and ±0)
1..2^e-1   ``(-1)^s · 2^(E-bias) · (1 + M/2^m)``  normals
=========  =====================================  ==========================================

``bias`` defaults to ``2^(e-1) - 1``. ``special`` says which encodings are not numbers:

* ``"none"``  every encoding is finite (OCP FP6 e3m2/e2m3, FP4 e2m1; FINN/Brevitas minifloats);
* ``"fn"``    only all-ones exponent *and* all-ones mantissa is NaN (OCP FP8 e4m3fn, max 448);
* ``"ieee"``  the all-ones exponent is reserved: ``M == 0`` is ±inf, otherwise NaN
  (OCP FP8 e5m2, max 57344).

``values()`` marks NaN *and* ±inf codes with NaN (neither is a value a weight can round to);
:func:`minifloat_values` gives the IEEE-style table with ±inf, for comparisons with torch's
float8 dtypes. Rounding is to the nearest value, ties to the even mantissa (``nearest_code``),
saturating at ±max (never to inf or NaN). The block scale is ``absmax·clip / max`` in float32;
rounding it to its storage dtype is the caller's job.

Names: ``fp{bits}_e{exp}m{man}``, with ``fn`` appended for ``"fn"`` (torch spelling,
``fp8_e4m3fn``). OCP defines e5m2 with inf, so ``fp8_e5m2`` is the ``"ieee"`` variant, and the
all-finite 8-bit e5m2 is ``fp8_e5m2_nospecial``; other ``"ieee"`` variants get ``_ieee``.
A non-default bias appends ``_b{bias}``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams, ScaleRounding, absmax, rounded, safe_scale

SPECIALS = ("none", "fn", "ieee")


def minifloat_values(exp: int, man: int, bias: int, special: str) -> Tensor:
    """IEEE-style value of every code, (2**(1+exp+man),) float64: ±inf and NaN included."""
    n = 2 ** (1 + exp + man)
    code = torch.arange(n, dtype=torch.int64)
    sign = torch.where((code >> (exp + man)) & 1 == 1, -1.0, 1.0).double()
    e_field = (code >> man) & (2**exp - 1)
    m_field = (code & (2**man - 1)).double()
    frac = m_field / 2**man
    normal = torch.exp2((e_field - bias).double()) * (1 + frac)
    subnormal = 2.0 ** (1 - bias) * frac
    v = sign * torch.where(e_field == 0, subnormal, normal)
    top_e, top_m = e_field == 2**exp - 1, m_field == 2**man - 1
    if special == "fn":
        v[top_e & top_m] = float("nan")
    elif special == "ieee":
        v[top_e] = float("nan")
        v[top_e & (m_field == 0)] = sign[top_e & (m_field == 0)] * float("inf")
    return v


@dataclass(frozen=True)
class FloatFormat(Format):
    """Minifloat ``ExMy`` with subnormals; symmetric (odd), scale = absmax·clip / max.

    exp >= 1, man >= 0, exp + man <= 7. ``bias=None`` means ``2^(exp-1) - 1`` and is replaced
    by that number, so ``FloatFormat(4, 3) == FloatFormat(4, 3, 7)``.
    """

    family = "float"
    exp: int = 4
    man: int = 3
    bias: int | None = None
    special: str = "none"

    def __post_init__(self) -> None:
        for field_name in ("exp", "man"):
            v = getattr(self, field_name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise LowbitError(f"float {field_name} {v!r} must be an integer")
        if self.exp < 1 or self.man < 0 or self.exp + self.man > 7:
            raise LowbitError(
                f"float e{self.exp}m{self.man} is not allowed; use exp >= 1, man >= 0 and exp + man <= 7"
            )
        if self.special not in SPECIALS:
            raise LowbitError(f"float special {self.special!r} is not allowed; use one of {SPECIALS}")
        if self.special == "ieee" and self.exp < 2:
            raise LowbitError(f"float special 'ieee' needs exp >= 2 (got {self.exp}); use 'none' or 'fn'")
        if self.special == "fn" and self.exp + self.man < 2:
            raise LowbitError(f"float special 'fn' needs exp + man >= 2 (got e{self.exp}m{self.man}); use 'none'")
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.exp - 1) - 1)
        if not isinstance(self.bias, int) or isinstance(self.bias, bool):
            raise LowbitError(f"float bias {self.bias!r} must be an integer or None")
        top = 2**self.exp - 1 - self.bias
        if top > 127 or 1 - self.bias - self.man < -149:
            raise LowbitError(
                f"float bias {self.bias} puts e{self.exp}m{self.man} outside float32; "
                f"use a bias between {2**self.exp - 128} and {150 - self.man}"
            )

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 1 + self.exp + self.man

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return True

    @property
    def name(self) -> str:
        base = f"fp{self.bits}_e{self.exp}m{self.man}"
        ocp_e5m2 = (self.exp, self.man) == (5, 2)
        if self.special == "fn":
            base += "fn"
        elif self.special == "ieee" and not ocp_e5m2:
            base += "_ieee"
        elif self.special == "none" and ocp_e5m2:
            base += "_nospecial"
        if self.bias != 2 ** (self.exp - 1) - 1:
            base += f"_b{self.bias}"
        return base

    def values(self) -> Tensor:
        v = minifloat_values(self.exp, self.man, self.bias, self.special)  # type: ignore[arg-type]
        return torch.where(torch.isinf(v), float("nan"), v)

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        return QParams(scale=rounded(absmax(blocks) * clip / self.max, round_scale))

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        return self.nearest(blocks / safe_scale(qp.scale))

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        return self.lookup(codes) * qp.scale


#: the named formats of this family, in the order ``lowbit formats`` lists them
PRESETS = (
    FloatFormat(4, 3, special="fn"),  # fp8_e4m3fn: OCP FP8, max 448
    FloatFormat(5, 2, special="ieee"),  # fp8_e5m2: OCP FP8, max 57344
    FloatFormat(4, 3),  # fp8_e4m3: all finite, max 480 (FINN/Brevitas style)
    FloatFormat(3, 2),  # fp6_e3m2: OCP FP6, max 28
    FloatFormat(2, 3),  # fp6_e2m3: OCP FP6, max 7.5
    FloatFormat(2, 2),  # fp5_e2m2: max 7
    FloatFormat(3, 1),  # fp5_e3m1: max 24
    FloatFormat(2, 1),  # fp4_e2m1: OCP FP4, {0, 0.5, 1, 1.5, 2, 3, 4, 6}
    FloatFormat(3, 0),  # fp4_e3m0: powers of two 0.25 .. 16 and 0
    FloatFormat(1, 1),  # fp3_e1m1: {0, 1, 2, 3}, the uniform int grid
)
