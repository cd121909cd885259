"""lowbit's codes and scales repacked bit for bit into llama.cpp's 32-element GGUF blocks.

No weight is requantized, so llama.cpp dequantizes to exactly what ``QuantizedTensor.dequantize``
gives:

=================  =========  ==========================  ============================================
lowbit spec        GGUF type  value                       block (bytes)
=================  =========  ==========================  ============================================
``int8:g32``       Q8_0       ``d·q``, q ∈ [-127, 127]    d fp16 · 32 int8                          (34)
``int4:g32``       Q4_0       ``d·(n - 8)``, n = q + 8    d fp16 · 16 bytes of nibbles              (18)
``uint4_fz:g32``   Q4_1       ``d·n + m``                 d fp16 · m fp16 · nibbles                 (20)
``int5:g32``       Q5_0       ``d·(n - 16)``, n = q + 16  d fp16 · 32 high bits · low nibbles       (22)
``uint5_fz:g32``   Q5_1       ``d·n + m``                 d fp16 · m fp16 · high bits · nibbles     (24)
=================  =========  ==========================  ============================================

Scales (and float zeros) must be stored as float16 (the default ``scale=float16``): GGUF's ``d``
and ``m`` are fp16. Nibble ``j`` of a block sits in the low half of byte ``j`` for ``j < 16`` and
in the high half of byte ``j - 16`` otherwise; the fifth bits of Q5 form a little-endian uint32.

Not exported, with a ``LowbitError`` that quotes the spec: other group sizes, bf16/f32 scales,
NF4, minifloats, MX and NVFP4 (no GGUF type holds them), and the integer-zero ``uint4:g32``:
its value ``s·(q - z) = s·q + (-s·z)`` fits Q4_1 only when ``-s·z`` is exact in fp16, which
needs up to 15 significant bits against fp16's 11, so almost no block is exact; quantize with
``uint4_fz:g32`` (min-max Q4_1) or ``int4:g32`` instead. K-quants (Q4_K, Q6_K) are not
written: their two-level 6-bit sub-scales have no lowbit spec yet.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import QParams
from lowbit.qtensor import QuantizedTensor, scale_storage
from lowbit.spec import PerGroup

SPECS = ("int8:g32 (Q8_0), int4:g32 or int4_ss:g32 (Q4_0), uint4_fz:g32 (Q4_1), int5:g32 or int5_ss:g32 (Q5_0), "
         "uint5_fz:g32 (Q5_1), float16 scales")
BLOCK = 32
# (bits, symmetric, zero kind) -> GGUF type name
CODECS = {(8, True, None): "Q8_0", (4, True, None): "Q4_0", (4, False, "float"): "Q4_1",
          (5, True, None): "Q5_0", (5, False, "float"): "Q5_1"}


def gguf_type(key: str, qt: QuantizedTensor) -> str:
    """The GGUF type that represents ``qt`` exactly; a ``LowbitError`` quoting the spec if none does."""
    from lowbit.schemes import describe

    spec, fmt = qt.spec, qt.spec.format
    name = CODECS.get((fmt.bits, fmt.symmetric, fmt.zero_kind)) if fmt.family == "int" else None
    if name is None or spec.granularity != PerGroup(BLOCK) or scale_storage(spec) != "float16":
        hint = "; quantize with uint4_fz:g32 (Q4_1) or int4_ss:g32 (Q4_0)" if fmt.zero_kind == "int" else ""
        raise LowbitError(f"{key}: spec {describe(spec)} has no exact GGUF type; gguf export supports "
                          f"{SPECS}{hint}")
    if qt.layout != "rows" or len(qt.shape) != 2 or qt.shape[1] % BLOCK or qt.global_scale is not None:
        raise LowbitError(f"{key}: a {list(qt.shape)} {qt.layout} tensor does not fill GGUF rows of "
                          f"{BLOCK}-element blocks; gguf export needs 2-D weights with columns divisible by {BLOCK}")
    return name


def _fp16_bytes(x: Tensor) -> np.ndarray:
    """(rows, nb) float32 holding fp16 values -> (rows, nb, 2) uint8."""
    return x.to(torch.float16).numpy().view(np.uint8).reshape(*x.shape, 2)


def pack_blocks(codes: Tensor, scale: Tensor, zero: Tensor | None, qtype: str) -> np.ndarray:
    """lowbit codes and qparams -> GGUF blocks, one row of bytes per matrix row.

    codes: (rows, cols) uint8 lowbit codes (symmetric: ``q + 2^(bits-1)``); cols % 32 == 0.
    scale, zero: (rows, cols/32) float32 holding fp16 values; zero only for Q4_1/Q5_1.
    Returns (rows, cols/32 * type_size) uint8.
    """
    rows, cols = codes.shape
    c = codes.reshape(rows, cols // BLOCK, BLOCK).numpy()  # (rows, nb, 32)
    parts = [_fp16_bytes(scale)]
    if zero is not None:
        parts.append(_fp16_bytes(zero))
    if qtype == "Q8_0":
        parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if qtype in ("Q5_0", "Q5_1"):
            parts.append(np.packbits((c >> 4) & 1, axis=-1, bitorder="little"))  # (rows, nb, 4)
        low = c & 0x0F
        parts.append(low[..., :16] | (low[..., 16:] << 4))  # (rows, nb, 16)
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def codes(qt: QuantizedTensor) -> Tensor:
    """(rows, cols) uint8 codes of ``qt``, unpacked in numpy (lowbit.packing's layout: a little-endian
    bit stream, code ``j`` at bits ``j·bits``), 20x faster than torch's uint8 shifts."""
    bits, (rows, cols) = qt.spec.format.bits, qt.matrix_shape
    n, p, mask = rows * cols, qt.packed.numpy(), 2**bits - 1
    if 8 % bits == 0:
        c = np.stack([(p >> (j * bits)) & mask for j in range(8 // bits)], axis=1)  # (nbytes, 8/bits)
    else:  # 8 codes in `bits` bytes
        groups = -(-n // 8)
        b = np.zeros(groups * bits, np.uint64)
        b[: p.size] = p
        v = (b.reshape(groups, bits) << (8 * np.arange(bits, dtype=np.uint64))).sum(axis=1)  # (groups,)
        c = ((v[:, None] >> (bits * np.arange(8, dtype=np.uint64))) & mask).astype(np.uint8)  # (groups, 8)
    return torch.from_numpy(c.reshape(-1)[:n].reshape(rows, cols))


def dequantize(qt: QuantizedTensor) -> Tensor:
    """``qt.dequantize()`` for the exportable specs (groups of 32 filling whole rows): the format's
    own dequantize on ``(rows·cols/32, 32)`` blocks, without unpacking the codes twice."""
    rows, cols = qt.matrix_shape
    zero = None if qt.zero is None else qt.zero.reshape(-1, 1)
    qp = QParams(qt.scale.reshape(-1, 1), zero)  # (rows·cols/32, 1): the grid in row-major block order
    return qt.spec.format.dequantize(codes(qt).reshape(-1, BLOCK), qp).reshape(rows, cols)
