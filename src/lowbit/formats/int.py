"""Uniform integer grids, 2 to 8 bits.

Symmetric (a scale, no zero point), stored as the offset code ``c = q + 2^(b-1)``, ``x̂ = s·q``:

===============  =================================  ===================================  ====
format           codes ``q``                        scale per block                      odd
===============  =================================  ===================================  ====
``intB``         ``[-2^(b-1), 2^(b-1) - 1]``,       ``absmax / 2^(b-1)``: a negative      no
                 all ``2^b`` codes                  absmax is exact, a positive one
                                                    clips to ``(2^(b-1) - 1)·s``
``intB_narrow``  ``±(2^(b-1) - 1)``, 2^b - 1 codes   ``absmax / (2^(b-1) - 1)``           yes
                 (code 0 unused; int2 ternary)
``intB_ss``      ``intB``'s                         ``m / -2^(b-1)``, ``m`` the signed    yes
                                                    weight of largest magnitude: exact
                                                    whatever its sign (below)
===============  =================================  ===================================  ====

``intB`` uses every code, as GPTQ's, brevitas's and GGUF Q4_0's symmetric grids do. Its scale
rule was chosen by measurement on SmolLM2-135M (``bench/int_grid.py``; RTN, float16 scales;
relative weight error over the 210 decoder linears / pydoc perplexity on 16 windows of 512
tokens, fp32 14.80; "–" not measured):

===========  =============================  ==============  ==============  ==================
rule         scale, codes                   int4 g64        int3 g128       int2 g64
===========  =============================  ==============  ==============  ==================
narrow       absmax/(N-1), ±(N-1) (before)  0.1127 / 21.99  0.2864 / 455.1  0.7210 / 6.7e6
half (kept)  absmax/N, [-N, N-1]            0.1031 / 20.87  0.2232 / 110.2  0.4241 / 4.5e7
gptq         2·absmax/(2N-1), [-N, N-1]     0.1074 / 21.93  0.2488 / 175.0  0.5236 / 4.4e6
cover        max(max/(N-1), -min/N)         0.1065 / 21.17  0.2645 / 218.0  0.6625 / –
best3        least-squares pick of the 3    0.1005 / –      –               0.4239 / –
===========  =============================  ==============  ==============  ==================

(``N = 2^(b-1)``; ``gptq`` is GPTQ's and compressed-tensors' symmetric rule.)

``half`` is kept: the lowest weight error of the closed forms at every width (``best3``, three
roundings per block, gains at most 0.003) and the lowest perplexity at 4 and 3 bits (20.87
against 21.99 before, 110.2 against 455.1); at int4 g128 too (22.38; cover 23.58, gptq 23.78,
narrow 25.42). The exception is int4 g32, where ``cover`` wins (19.13; narrow 19.87, half
21.08): SmolLM2's weights come from Q4_1 blocks of 32, whose extremes are exact grid values
that any clip moves, an artefact of this model rather than a rule. At 2 bits round-to-nearest
destroys the model under every rule (perplexity far above the vocabulary size, 49152), so
perplexity ranks nothing there.

One rule beats ``half``: GGUF Q4_0's and auto-round's *signed* scale, ``s = m/(-N)`` with ``m``
the block's weight of largest magnitude (the first one, on a tie), so that ``m`` sits exactly on
code ``-N`` whatever its sign; the scale is negative when ``m > 0``. At int4 g64 it gives
0.0984 / 18.68 against ``half``'s 0.1031 / 20.87 (``bench/int_grid.py --rules half,signed``).
It is offered as ``intB_ss`` (``signed_scale=True``), not as ``intB``'s rule, so that every
model and recipe made with ``intB`` keeps its bytes. Its codes and tables are ``intB``'s, and
so are its kernels and exports (GGUF ``int4_ss:g32`` is Q4_0, which stores the same signed
scale). Flipping the block flips ``m`` and the scale and keeps the codes, so ``intB_ss`` is odd,
``Q(-x) = -Q(x)``, although its table is not.

Format dicts written before the full range existed (format version 1: no ``narrow_range``
field) meant the narrow grid and still load as ``intB_narrow`` (``IntFormat.upgrade_dict``).

Asymmetric: ``q ∈ [0, 2^b - 1]`` with either

* ``zero="int"``   an integer zero point, ``x̂ = s·(q - z)``; the range always contains 0, so
  zero is exact (the usual choice of GPTQ, AWQ and compressed-tensors); ``z`` is fitted to the
  scale as stored (``round(-min/s)``);
* ``zero="float"`` a float offset equal to the block minimum, ``x̂ = s·q + m`` (GGUF Q4_1, HQQ).
  This reproduces weights that already sit on a Q4_1 grid exactly. A clip ratio ``c < 1``
  shrinks the range around its midpoint (:func:`shrink`) instead of scaling both ends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams, ScaleRounding, absmax, rounded, safe_scale


@dataclass(frozen=True)
class IntFormat(Format):
    """``bits`` 2..8; ``symmetric`` (a scale only) or asymmetric with ``zero`` "int" or "float";
    ``narrow_range`` (symmetric only) drops the code ``-2^(b-1)`` for the odd restricted grid;
    ``signed_scale`` (symmetric, full range) takes GGUF Q4_0's signed scale ``m / -2^(b-1)``."""

    family = "int"
    bits: int = 4
    symmetric: bool = True
    zero: str = "int"  # asymmetric only: "int" or "float"
    narrow_range: bool = False  # symmetric only: q in [-(2^(b-1)-1), 2^(b-1)-1]
    signed_scale: bool = False  # symmetric full range only: s = m / -2^(b-1), negative when m > 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise LowbitError(f"int bits {self.bits} is out of range; use 2 to 8")
        if self.zero not in ("int", "float"):
            raise LowbitError(f"int zero {self.zero!r} is not allowed; use 'int' or 'float'")
        if self.narrow_range and not self.symmetric:
            raise LowbitError(f"narrow_range applies to symmetric int formats only, not uint{self.bits}; "
                              "leave narrow_range False for an asymmetric format")
        if self.signed_scale and (self.narrow_range or not self.symmetric):
            raise LowbitError(f"signed_scale applies to the full-range symmetric grid (int{self.bits}) only, "
                              f"not {self.name}; leave signed_scale False")

    @classmethod
    def upgrade_dict(cls, d: dict) -> dict:
        """Format version 1 (no ``narrow_range`` field) stored the restricted symmetric grid."""
        if "narrow_range" not in d and d.get("symmetric", True):
            return {**d, "narrow_range": True}
        return d

    @property
    def name(self) -> str:
        if self.symmetric:
            return f"int{self.bits}" + ("_narrow" if self.narrow_range else "_ss" if self.signed_scale else "")
        return f"uint{self.bits}" + ("_fz" if self.zero == "float" else "")

    @property
    def qmax(self) -> int:
        """Largest code value: ``2^(b-1) - 1`` (symmetric) or ``2^b - 1``."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        """Smallest code value: ``-2^(b-1)``, ``-(2^(b-1) - 1)`` (narrow range) or 0."""
        if not self.symmetric:
            return 0
        return -self.qmax if self.narrow_range else -(2 ** (self.bits - 1))

    @property
    def odd(self) -> bool:
        return self.symmetric and (self.narrow_range or self.signed_scale)

    @property
    def zero_kind(self) -> str | None:
        return None if self.symmetric else self.zero

    def values(self) -> Tensor:
        n = 2**self.bits
        v = torch.arange(n, dtype=torch.float64)
        if self.symmetric:
            v = v - 2 ** (self.bits - 1)
            if self.narrow_range:
                v[0] = float("nan")  # -2^(b-1) is never produced
        return v

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        """Min-max qparams (see the module table); an integer zero is fitted to the rounded scale."""
        if self.symmetric and self.signed_scale:
            return QParams(scale=rounded(signed_absmax(blocks) * clip / self.qmin, round_scale))
        if self.symmetric:
            return QParams(scale=rounded(absmax(blocks) * clip / -self.qmin, round_scale))
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
            q = (blocks / s).round_().clamp_(self.qmin, self.qmax).add_(2 ** (self.bits - 1))
        elif self.zero == "int":
            q = (torch.round(blocks / s) + qp.zero).clamp_(0, self.qmax)
        else:
            q = ((blocks - qp.zero) / s).round_().clamp_(0, self.qmax)
        return q.to(torch.uint8)

    def fake_quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        """``dequantize(quantize(·))`` in float32 throughout, without the uint8 codes: the same
        integer levels times the same scale (a learned-rounding step calls it for every weight)."""
        s = safe_scale(qp.scale)
        if self.symmetric:
            return (blocks / s).round_().clamp_(self.qmin, self.qmax).mul_(qp.scale)
        if self.zero == "int":
            return (torch.round(blocks / s) + qp.zero).clamp_(0, self.qmax).sub_(qp.zero).mul_(qp.scale)
        return ((blocks - qp.zero) / s).round_().clamp_(0, self.qmax).mul_(qp.scale).add_(qp.zero)

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        q = codes.to(torch.float32, copy=True)  # in place on the fresh copy: the same values, fewer passes
        if self.symmetric:
            return q.sub_(2 ** (self.bits - 1)).mul_(qp.scale)
        if self.zero == "int":
            return q.sub_(qp.zero).mul_(qp.scale)
        return q.mul_(qp.scale).add_(qp.zero)


def signed_absmax(blocks: Tensor) -> Tensor:
    """(n_blocks, block_size) -> (n_blocks, 1) the weight of largest magnitude, with its sign (the
    first one on a tie, as GGUF's Q4_0 reference takes it)."""
    return blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))


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


#: the named formats of this family, in the order ``lowbit formats`` lists them
PRESETS = tuple(fmt for b in range(2, 9) for fmt in (IntFormat(b, True), IntFormat(b, True, narrow_range=True),
                                                      IntFormat(b, True, signed_scale=True),
                                                      IntFormat(b, False, "int"), IntFormat(b, False, "float")))
