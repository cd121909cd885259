"""Binary (1 bit) and ternary (2 bits) weights.

``BinaryFormat``: ``x̂ = ±scale`` with ``scale = mean|x|·clip`` per block, the L2-optimal scale
for sign codes (XNOR-Net). Code 1 for ``x >= 0`` (so 0 maps to ``+scale``), code 0 otherwise.
Quantization never divides by the scale, and an all-zero block has scale 0, so it
reconstructs to exactly 0.

``TernaryFormat``: codes ``{0: -1, 1: 0, 2: +1}`` (code 3 unused). Scale from TWN
(Li & Liu, 2016): ``Δ = 0.7·mean|x|``, ``scale = mean(|x| : |x| > Δ)`` (``absmax`` if no
element exceeds Δ, which only happens for an all-zero block), times ``clip``. Rounding is to
the nearest of ``{-s, 0, +s}`` (threshold ``s/2``, ties to the even code, i.e. away from 0), not
TWN's threshold ``Δ``: it keeps the "nearest grid value" contract that every format shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.base import Format, QParams, ScaleRounding, absmax, rounded, safe_scale

#: TWN's threshold factor: Δ = 0.7·mean|x| approximates the optimum for Gaussian weights.
TWN_DELTA = 0.7


@dataclass(frozen=True)
class BinaryFormat(Format):
    """1 bit: ``x̂ = scale·(+1 if x >= 0 else -1)``, ``scale = mean|x|·clip``."""

    family = "binary"

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 1

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return True  # odd for every x != 0

    @property
    def name(self) -> str:
        return "binary"

    def values(self) -> Tensor:
        return torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        return QParams(scale=rounded(blocks.abs().mean(dim=1, keepdim=True) * clip, round_scale))

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        return (blocks >= 0).to(torch.uint8)

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        return (codes.to(torch.float32) * 2 - 1) * qp.scale


@dataclass(frozen=True)
class TernaryFormat(Format):
    """2 bits: ``x̂ ∈ {-s, 0, +s}``, TWN's scale, nearest rounding."""

    family = "ternary"

    @property
    def bits(self) -> int:  # type: ignore[override]
        return 2

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return True

    @property
    def name(self) -> str:
        return "ternary"

    def values(self) -> Tensor:
        return torch.tensor([-1.0, 0.0, 1.0, float("nan")], dtype=torch.float64)

    def choose_qparams(self, blocks: Tensor, clip: float = 1.0, global_scale: Tensor | None = None,
                       round_scale: ScaleRounding | None = None) -> QParams:
        mag = blocks.abs()  # (n_blocks, block_size)
        delta = TWN_DELTA * mag.mean(dim=1, keepdim=True)
        above = mag > delta
        count = above.sum(dim=1, keepdim=True)
        mean_above = (mag * above).sum(dim=1, keepdim=True) / count.clamp(min=1)
        scale = torch.where(count > 0, mean_above, absmax(blocks))
        return QParams(scale=rounded(scale * clip, round_scale))

    def quantize(self, blocks: Tensor, qp: QParams) -> Tensor:
        return self.nearest(blocks / safe_scale(qp.scale))

    def dequantize(self, codes: Tensor, qp: QParams) -> Tensor:
        return self.lookup(codes) * qp.scale


#: the named formats of this family, in the order ``lowbit formats`` lists them
PRESETS = (BinaryFormat(), TernaryFormat())
