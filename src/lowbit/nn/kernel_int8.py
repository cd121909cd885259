"""int8 weight-only matmul on PyTorch's CPU kernel ``aten._weight_int8pack_mm``.

For symmetric int8 with one scale per output row (``int8:channel``) or per tensor. The kernel
multiplies bf16 activations by int8 weights and returns bf16; lowbit passes unit scales and
applies its own float32 scales afterwards, so the stored scales are never rounded to bf16.
What the kernel rounds is the activations to bf16 and the row sums to bf16 (a relative error
of about 2^-8 per output; ``tests/nn`` states the tolerance).

Measured on the 2-core CPU here (one token, 1536×576): 0.040 ms against 0.053 ms for the
float32 matmul; with float32 or float16 activations the kernel is ten times slower, so
activations always go in as bf16.

The kernel reads out of bounds when the input dimension is not a multiple of 16 (measured: a
segmentation fault at K=40), so K is zero-padded to a multiple of 16 (weights at pack time,
activations per call).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.int import IntFormat
from lowbit.qtensor import QuantizedTensor
from lowbit.spec import PerChannel, PerTensor

NAME = "int8"
_K_MULTIPLE = 16


def supports(qt: QuantizedTensor) -> str | None:
    """None when this kernel runs ``qt``, else the reason it does not."""
    fmt, g = qt.spec.format, qt.spec.granularity
    if not (isinstance(fmt, IntFormat) and fmt.bits == 8 and fmt.symmetric):
        return f"{fmt.name} is not symmetric int8"
    if not isinstance(g, (PerChannel, PerTensor)):
        return "int8 kernel needs one scale per row or per tensor"
    return None


def pack(qt: QuantizedTensor) -> dict[str, Tensor]:
    """-> ``w`` (N, K_pad) int8 weights, ``s`` (N, 1) float32 row scales."""
    rows, cols = qt.matrix_shape
    w = (qt.codes().to(torch.int16) - 128).to(torch.int8)  # (N, K) signed codes, -127..127
    pad = -cols % _K_MULTIPLE
    if pad:
        w = torch.cat([w, w.new_zeros(rows, pad)], dim=1)
    s = qt.scale.reshape(-1).expand(rows) if qt.scale.numel() == 1 else qt.scale.reshape(rows)
    return {"w": w.contiguous(), "s": s.to(torch.float32).contiguous(),
            "ones": torch.ones(rows, dtype=torch.bfloat16)}


def matmul(x: Tensor, t: dict[str, Tensor]) -> Tensor:
    """x (M, K) float -> (M, N) float32 (bf16 kernel output times float32 scales)."""
    w = t["w"]
    xb = x.to(torch.bfloat16)
    if xb.shape[1] != w.shape[1]:
        xb = torch.nn.functional.pad(xb, (0, w.shape[1] - xb.shape[1]))
    return torch.ops.aten._weight_int8pack_mm(xb, w, t["ones"]) * t["s"]


def codes(t: dict[str, Tensor], cols: int) -> Tensor:
    """(N, cols) uint8 lowbit codes back from the packed weights."""
    return (t["w"][:, :cols].to(torch.int16) + 128).to(torch.uint8)
