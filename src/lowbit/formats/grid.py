"""Non-uniform grids: an arbitrary value table (``CodebookFormat``, NF4) and the NUPES power
quantizer (``PowerFormat``).

``CodebookFormat(table, label)``: codes index the sorted table (padded with NaN up to
``2**bits``), rounding is to the nearest value, the block scale is ``absmax·clip / max|table|``.
The field is called ``table`` rather than ``values`` because ``values()`` is the contract's
method.

``PowerFormat(bits, a)`` (Yvinec et al., "PowerQuant: Automorphism Search for Non-Uniform
Quantization", arXiv:2301.09858; "NUPES: Non-Uniform Post-Training Quantization via Power
Exponent Search", arXiv:2308.05600): with block scale
``S = absmax·clip`` and ``qmax = 2^(bits-1) - 1``::

    q  = sign(x) · min(round((|x| / S)^a · qmax), qmax)     rounding in the power domain
    x̂  = S · sign(q) · (|q| / qmax)^(1/a)

This is the paper's ``q = sign(x)·round(|x|^a / s)``, ``s = (c·max|x|)^a / qmax``,
``x̂ = sign(q)·(s|q|)^(1/a)`` with ``c = clip``, written with the block scale outside the power
so that the scale is stored like any other. Codes are stored as ``q + 2^(bits-1)``; code 0 is
never produced (NaN in ``values()``). ``a = 1`` is the narrow-range int grid (``int4_narrow``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams, ScaleRounding, absmax, rounded, safe_scale
from lowbit.formats.nearest import NearestTable

#: QLoRA NormalFloat-4 (bitsandbytes ``NF4`` lookup table), exact published constants.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class CodebookFormat(Format):
    """Any sorted table of 2 to 256 distinct finite values; ``bits = ceil(log2(len))``.

    ``symmetric`` is True iff the table is odd-symmetric (``t == -t[::-1]``). Ties go to the
    even code (``nearest_code``); for symmetric tables the magnitude is rounded on the
    non-negative half and the sign is mirrored, so that ``Q(-x) == -Q(x)`` holds at ties too.
    """

    family = "codebook"
    table: tuple[float, ...]
    label: str = "codebook"

    def __post_init__(self) -> None:
        t = tuple(float(v) for v in self.table)
        if not 2 <= len(t) <= 256:
            raise LowbitError(f"codebook has {len(t)} values; use 2 to 256")
        if not all(math.isfinite(v) for v in t):
            raise LowbitError(f"codebook {self.label!r} has non-finite values; use finite numbers only")
        t = tuple(sorted(t))
        if any(a == b for a, b in zip(t, t[1:])):
            raise LowbitError(f"codebook {self.label!r} has repeated values; use distinct values")
        if max(abs(t[0]), abs(t[-1])) == 0:
            raise LowbitError(f"codebook {self.label!r} needs a nonzero value")
        object.__setattr__(self, "table", t)

    @property
    def bits(self) -> int:  # type: ignore[override]
        return max(1, math.ceil(math.log2(len(self.table))))

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return all(a == -b for a, b in zip(self.table, reversed(self.table)))

    @property
    def name(self) -> str:
        return self.label

    def values(self) -> Tensor:
        v = torch.full((2**self.bits,), float("nan"), dtype=torch.float64)
        v[: len(self.table)] = torch.tensor(self.table, dtype=torch.float64)
        return v

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        return QParams(scale=rounded(absmax(blocks) * clip / self.max, round_scale))

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        x = blocks / safe_scale(qp.scale)
        half = _half_table(self, x.device)
        if half is None:
            return self.nearest(x)
        code = half(x.abs(), torch.uint8)
        return torch.where(x < 0, len(self.table) - 1 - code, code)

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        return self.lookup(codes) * qp.scale


@functools.lru_cache(maxsize=64)
def _half_table(fmt: CodebookFormat, device: torch.device) -> NearestTable | None:
    """For a symmetric table, its non-negative half (and 0 when odd-sized); else None."""
    if not fmt.symmetric:
        return None
    half = fmt.values()
    half[: len(fmt.table) // 2] = float("nan")
    return NearestTable.build(half, device)


@dataclass(frozen=True)
class PowerFormat(Format):
    """NUPES power quantizer, ``bits`` 2..8, exponent ``a`` in (0, 1]; scale = absmax·clip.

    Elementwise given the scale only up to the last bit of torch's float64 ``pow``: for
    ``a != 0.5`` its vectorized and scalar loops can differ by an ulp, so an element whose
    power-domain value lies within an ulp of a half-integer may round differently depending on
    its place in memory. ``a = 0.5`` (the presets) is a correctly rounded square root.
    """

    family = "power"
    bits: int = 4
    a: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"power bits {self.bits!r} is out of range; use 2 to 8")
        if not (isinstance(self.a, (int, float)) and 0 < self.a <= 1):
            raise LowbitError(f"power exponent a={self.a!r} is not allowed; use 0 < a <= 1")
        object.__setattr__(self, "a", float(self.a))

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return True

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        return f"pow{self.bits}_a{self.a:g}"

    def values(self) -> Tensor:
        q = torch.arange(2**self.bits, dtype=torch.float64) - 2 ** (self.bits - 1)
        v = torch.sign(q) * (q.abs() / self.qmax) ** (1 / self.a)
        v[0] = float("nan")
        return v

    def power_domain(self, blocks: Tensor, qp: QParams) -> Tensor:
        """``(|x| / S)^a · qmax`` in float64: the quantity that is rounded to ``|q|``."""
        y = blocks.abs().to(torch.float64)  # a new tensor: the in-place steps below are safe
        return y.div_(safe_scale(qp.scale).double()).pow_(self.a).mul_(self.qmax)

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        q = self.power_domain(blocks, qp).round_().clamp_(max=self.qmax)  # ties to even
        q = q.copysign_(blocks)  # -|q| for x < 0; for x = -0, q = 0 gives the same code
        return q.add_(2 ** (self.bits - 1)).to(torch.uint8)

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        return QParams(scale=rounded(absmax(blocks) * clip, round_scale))

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        return self.lookup(codes) * qp.scale


#: the named formats of this family, in the order ``lowbit formats`` lists them. The power
#: presets' a = 0.5 (square-root companding) is a guess between the small-check optima for
#: Gaussian (a ≈ 0.62) and Laplace (a ≈ 0.5) data at 4 bits; ``algorithms.nupes.search_exponent``
#: finds a per-weight value.
PRESETS = (CodebookFormat(NF4_VALUES, "nf4"), *(PowerFormat(b, 0.5) for b in (3, 4, 5, 6, 8)))
