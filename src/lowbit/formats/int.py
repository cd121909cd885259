"""Uniform integer grids, 2 to 8 bits.

Symmetric: restricted range ``q ∈ [-(2^(b-1)-1), 2^(b-1)-1]`` so that quantization is odd;
stored as the offset code ``q + 2^(b-1)`` (code 0 is never produced).
Asymmetric: ``q ∈ [0, 2^b - 1]`` with either

* ``zero="int"``   an integer zero point, ``x̂ = s·(q - z)``; the range always contains 0, so
  zero is exact (the usual choice of GPTQ, AWQ and compressed-tensors);
* ``zero="float"`` a float offset equal to the block minimum, ``x̂ = s·q + m`` (GGUF Q4_1, HQQ).
  This reproduces weights that already sit on a Q4_1 grid exactly. A clip ratio ``c < 1``
  shrinks the range around its midpoint (:func:`shrink`) instead of scaling both ends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams, ScaleRounding, absmax, register_preset, rounded, safe_scale


@dataclass(frozen=True)
class IntFormat(Format):
    family = "int"
    bits: int = 4
    symmetric: bool = True
    zero: str = "int"  # asymmetric only: "int" or "float"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"int bits {self.bits} is out of range; use 2 to 8")
        if self.zero not in ("int", "float"):
            raise LowbitError(f"int zero {self.zero!r} is not allowed; use 'int' or 'float'")

    @property
    def name(self) -> str:
        if self.symmetric:
            return f"int{self.bits}"
        return f"uint{self.bits}" + ("_fz" if self.zero == "float" else "")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def zero_kind(self) -> str | None:
        return None if self.symmetric else self.zero

    def values(self) -> Tensor:
        n = 2**self.bits
        v = torch.arange(n, dtype=torch.float64)
        if self.symmetric:
            v = v - 2 ** (self.bits - 1)
            v[0] = float("nan")  # restricted range: -2^(b-1) is never produced
        return v

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        """Min-max qparams; an integer zero is fitted to the rounded scale (``Format``)."""
        if self.symmetric:
            return QParams(scale=rounded(absmax(blocks) * clip / self.qmax, round_scale))
        lo = blocks.amin(dim=1, keepdim=True)
        hi = blocks.amax(dim=1, keepdim=True)
        if self.zero == "int":
            lo, hi = (lo * clip).clamp(max=0), (hi * clip).clamp(min=0)
            scale = rounded((hi - lo) / self.qmax, round_scale)
            zero = torch.round(-lo / safe_scale(scale)).clamp(0, self.qmax)
            return QParams(scale=scale, zero=zero)
        if clip != 1.0:  # clip 1 keeps the exact block minimum as the zero
            lo, hi = shrink(lo, hi, clip)
        return QParams(scale=rounded((hi - lo) / self.qmax, round_scale), zero=lo)

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        s = safe_scale(qp.scale)
        if self.symmetric:  # in place on the fresh quotient: fewer passes per call
            q = (blocks / s).round_().clamp_(-self.qmax, self.qmax).add_(2 ** (self.bits - 1))
        elif self.zero == "int":
            q = (torch.round(blocks / s) + qp.zero).clamp_(0, self.qmax)
        else:
            q = ((blocks - qp.zero) / s).round_().clamp_(0, self.qmax)
        return q.to(torch.uint8)

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        q = codes.to(torch.float32)
        if self.symmetric:
            return (q - 2 ** (self.bits - 1)) * qp.scale
        if self.zero == "int":
            return (q - qp.zero) * qp.scale
        return q * qp.scale + qp.zero


def shrink(lo: Tensor, hi: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """The range ``[lo, hi]`` (n_blocks, 1) shrunk by ``clip`` around its midpoint.

    [0.5, 1] at 0.9 becomes [0.525, 0.975] (scaling both ends, the rule before, shifted it to
    [0.45, 0.9]). Measured on SmolLM2-135M (``bench/int_grid.py --fz-anchor``: relative weight
    error of ``uint4_fz:g64:mse``, 21 ratios, float16 storage; no g64 block there is one-sided):
    0.07592 scaling both ends (around 0), 0.07592 around the end nearer 0, 0.07509 around the
    midpoint.
    """
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return mid - clip * half, mid + clip * half


for _b in range(2, 9):
    register_preset(IntFormat(_b, True))
    register_preset(IntFormat(_b, False, "int"))
    register_preset(IntFormat(_b, False, "float"))
