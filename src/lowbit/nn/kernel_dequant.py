"""Dequantize-then-matmul by row blocks: every format, never the whole float32 weight.

The packed codes stay as they are. Each call walks the output rows in chunks of about
``CHUNK_ELEMENTS`` weights, unpacks and dequantizes one chunk through the format's own
``dequantize`` (so numerics equal ``QuantizedTensor.dequantize`` exactly), and multiplies.
Peak extra memory is one float32 chunk (4 MiB by default), whatever the layer size.

A chunk starts at a row that is a multiple of 8 (and of the tile height), so its codes start on
a byte boundary of the packed stream for any bit width.
"""
from __future__ import annotations

from math import lcm

import torch
from torch import Tensor

from lowbit.qtensor import QuantizedTensor, matrix_view
from lowbit.spec import PerTensor

NAME = "dequant"
CHUNK_ELEMENTS = 1 << 20


def supports(qt: QuantizedTensor) -> str | None:
    return None


def chunk_rows(qt: QuantizedTensor) -> int:
    rows, cols = qt.matrix_shape
    step = 8 if isinstance(qt.spec.granularity, PerTensor) else lcm(8, qt.tile[0])
    return max(step, CHUNK_ELEMENTS // max(cols, 1) // step * step)


def row_chunk(qt: QuantizedTensor, r0: int, r1: int) -> QuantizedTensor:
    """Rows [r0, r1) of ``qt``'s matrix view as a QuantizedTensor of their own (no copy of the codes).

    The chunk keeps its rows of the mask; low-rank factors and the input spec stay with the
    caller (``QuantLinear`` adds the low-rank term and quantizes the input itself).
    """
    rows, cols = qt.matrix_shape
    bits = qt.spec.format.bits
    b0, b1 = r0 * cols * bits // 8, -(-r1 * cols * bits // 8)
    if isinstance(qt.spec.granularity, PerTensor):
        scale, zero = qt.scale, qt.zero
    else:
        tr = qt.tile[0]
        g0, g1 = r0 // tr, -(-r1 // tr)
        scale = qt.scale[g0:g1]
        zero = None if qt.zero is None else qt.zero[g0:g1]
    mask = None if qt.mask is None else matrix_view(qt.mask, qt.layout)[r0:r1]
    return QuantizedTensor(qt.spec, (r1 - r0, cols), "rows", qt.packed[b0:b1], scale, zero, qt.global_scale, mask)


def matmul(x: Tensor, qt: QuantizedTensor) -> Tensor:
    """x (M, K) float -> (M, N) float32: ``x @ (masked codes·scales)ᵀ`` (no low-rank term)."""
    rows, _ = qt.matrix_shape
    step = chunk_rows(qt)
    x32 = x.to(torch.float32)
    out = torch.empty(x.shape[0], rows, dtype=torch.float32, device=x.device)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        out[:, r0:r1] = x32 @ row_chunk(qt, r0, r1).dequantize().t()
    return out
