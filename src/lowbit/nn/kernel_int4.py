"""Group-wise 4-bit (and narrower) integer matmul on ``aten._weight_int4pack_mm_for_cpu``.

The kernel dequantizes ``w = (c - 8)·s + z`` per group of ``kg`` inputs (``kg`` in 32, 64,
128, 256), with 4-bit codes ``c`` and a bf16 (scale, offset) pair per group and output row.
Every lowbit integer format of 2 to 4 bits maps onto it exactly, code for code:

=====================  ========================  ==============================
lowbit format          lowbit value              kernel code, offset
=====================  ========================  ==============================
``intB`` (symmetric)   ``(c - 2^(B-1))·s``       ``c - 2^(B-1) + 8``, ``0``
``uintB`` (int zero)   ``(c - z)·s``             ``c``, ``(8 - z)·s``
``uintB_fz``           ``c·s + m``               ``c``, ``m + 8·s``
=====================  ========================  ==============================

What the kernel rounds: activations, scales and offsets to bf16 and outputs to bf16 (a
relative error of about 2^-8; ``tests/nn`` states the tolerance). 2- and 3-bit codes take
4 bits each in memory here.

lowbit groups of size ``g`` map to kernel groups of the largest ``kg`` dividing ``g``; a final
partial group (576 inputs at g128 end with 64) still aligns because it starts at a multiple of
``g``. The input dimension is zero-padded to a multiple of ``kg`` and the output dimension to a
multiple of 16 (the kernel's requirements, measured on torch 2.13), and sliced back.

Measured on the 2-core CPU here (one token): 0.056 ms for 1536×576 (float32: 0.053 ms) and
1.33 ms for the 49152×576 vocabulary projection (float32: 3.21 ms, bf16: 2.69 ms). Activations
go in as bf16: in float32 the kernel is twenty times slower.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.int import IntFormat
from lowbit.qtensor import QuantizedTensor
from lowbit.spec import PerChannel, PerGroup, PerTensor

NAME = "int4"
_KG = (256, 128, 64, 32)
_N_MULTIPLE = 16


def _kernel_group(qt: QuantizedTensor) -> int | None:
    g, cols = qt.spec.granularity, qt.matrix_shape[1]
    if isinstance(g, PerGroup):
        return next((kg for kg in _KG if g.size % kg == 0), None)
    # one scale per row or tensor: any kernel group works; the least padding, then the largest
    return min(_KG, key=lambda kg: (-cols % kg, -kg))


def supports(qt: QuantizedTensor) -> str | None:
    fmt, g = qt.spec.format, qt.spec.granularity
    if not (isinstance(fmt, IntFormat) and fmt.bits <= 4):
        return f"{fmt.name} is not an integer format of 4 bits or fewer"
    if not isinstance(g, (PerGroup, PerChannel, PerTensor)):
        return "int4 kernel needs groups along the input, one scale per row, or per tensor"
    if _kernel_group(qt) is None:
        return f"group size {g.size} is not a multiple of 32"
    return None


def pack(qt: QuantizedTensor) -> dict[str, Tensor]:
    """-> ``w`` (N_pad, K_pad/2) uint8 kernel layout, ``sz`` (K_pad/kg, N_pad, 2) bf16."""
    fmt = qt.spec.format
    rows, cols = qt.matrix_shape
    kg = _kernel_group(qt)
    k_pad, n_pad = cols + (-cols % kg), rows + (-rows % _N_MULTIPLE)
    c = qt.codes().to(torch.int32)  # (N, K)
    scale = _per_kernel_group(qt.scale, qt, kg, k_pad)  # (N, K_pad/kg) float32
    if fmt.symmetric:
        c = c - 2 ** (fmt.bits - 1) + 8
        offset = torch.zeros_like(scale)
    elif fmt.zero == "int":
        offset = (8 - _per_kernel_group(qt.zero, qt, kg, k_pad)) * scale
    else:
        offset = _per_kernel_group(qt.zero, qt, kg, k_pad) + 8 * scale
    w = torch.full((n_pad, k_pad), 8, dtype=torch.int32)  # padding decodes to 0·s + offset; x pads with 0
    w[:rows, :cols] = c
    sz = torch.zeros(k_pad // kg, n_pad, 2, dtype=torch.float32)
    sz[:, :rows, 0], sz[:, :rows, 1] = scale.t(), offset.t()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 2)
    return {"w": packed, "sz": sz.to(torch.bfloat16)}


def _per_kernel_group(grid: Tensor, qt: QuantizedTensor, kg: int, k_pad: int) -> Tensor:
    """(rows, grid_cols) scale grid -> (rows, K_pad/kg), one value per kernel group."""
    rows, _ = qt.matrix_shape
    tile_cols = qt.tile[1]
    starts = torch.arange(0, k_pad, kg)  # first input of each kernel group
    idx = (starts // tile_cols).clamp(max=grid.shape[1] - 1)
    return grid.expand(rows, grid.shape[1])[:, idx] if grid.shape[0] == 1 else grid[:, idx]


def _geometry(t: dict[str, Tensor]) -> tuple[int, int]:
    """(kg, K_pad) from the packed shapes: w is (N_pad, K_pad/2), sz (K_pad/kg, N_pad, 2)."""
    k_pad = t["w"].shape[1] * 2
    return k_pad // t["sz"].shape[0], k_pad


def matmul(x: Tensor, t: dict[str, Tensor], n: int) -> Tensor:
    """x (M, K) float -> (M, n) bf16; ``n`` is the true output count (rows beyond are padding)."""
    kg, k_pad = _geometry(t)
    xb = x.to(torch.bfloat16)
    if xb.shape[1] != k_pad:
        xb = torch.nn.functional.pad(xb, (0, k_pad - xb.shape[1]))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), t["w"], kg, t["sz"])
    return y if y.shape[1] == n else y[:, :n]


def codes(t: dict[str, Tensor], cols: int, n: int, fmt: IntFormat) -> Tensor:
    """(n, cols) uint8 lowbit codes read back through the kernel itself.

    With unit scales and zero offsets the kernel returns ``c - 8`` for a one-hot input; the
    values -8..7 are exact in bf16, so this recovers every code exactly.
    """
    kg, _ = _geometry(t)
    unit = torch.zeros_like(t["sz"])
    unit[..., 0] = 1
    k_pad = unit.shape[0] * kg
    out = torch.empty(n, cols, dtype=torch.uint8)
    for start in range(0, cols, 256):
        stop = min(start + 256, cols)
        eye = torch.zeros(stop - start, k_pad, dtype=torch.bfloat16)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, t["w"], kg, unit)[:, :n]  # (chunk, N): c' - 8
        c = y.to(torch.int32) + 8
        if fmt.symmetric:
            c = c - 8 + 2 ** (fmt.bits - 1)
        out[:, start:stop] = c.t().to(torch.uint8)
    return out
