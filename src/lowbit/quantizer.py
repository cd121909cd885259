"""Round a weight to a ``QuantSpec``: checks, the walk over a granularity's tiles, and packing.

This is the shared path of every algorithm: round-to-nearest calls it directly, and
calibrated algorithms call ``choose_qparams`` (re-exported from :mod:`lowbit.observers`, which
holds the scale and zero rules) and the format's quantize/dequantize themselves.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format
from lowbit.grouping import empty_grid, from_blocks, grid_put, regions, to_blocks
from lowbit.observers import choose_qparams
from lowbit.packing import pack
from lowbit.qtensor import QuantizedTensor, matrix_view
from lowbit.spec import PerBlock, PerGroup, QuantSpec, tile_of

__all__ = ["check_weight", "choose_qparams", "pack_matrix", "quantize_matrix", "quantize_weight"]


def check_weight(w: Tensor, spec: QuantSpec, rows: int, cols: int, name: str = "weight") -> None:
    """Raise ``LowbitError`` for non-finite weights or a granularity larger than the matrix."""
    if w.numel() and not torch.isfinite(torch.stack(torch.aminmax(w))).all():  # one pass; NaN propagates
        bad = int((~torch.isfinite(w)).sum())
        raise LowbitError(f"{name} has {bad} NaN or Inf values; fix or skip it before quantizing")
    g = spec.granularity
    if isinstance(g, PerGroup) and g.size > cols and spec.format.fixed_block is None:
        raise LowbitError(
            f"group size {g.size} is larger than {name}'s input dimension {cols}; "
            f"use a group size of at most {cols}, or per-channel"
        )
    if isinstance(g, PerBlock) and (g.rows > rows or g.cols > cols):
        raise LowbitError(f"block {g.rows}x{g.cols} is larger than {name}'s matrix {rows}x{cols}")


def quantize_matrix(m: Tensor, spec: QuantSpec, global_scale: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest of a (rows, cols) float32 matrix view.

    Returns ``codes`` (rows, cols) uint8 and the ``scale`` / ``zero`` grids
    (ceil(rows/tr), ceil(cols/tc)) float32 (``zero`` is None for formats without one).
    """
    rows, cols = m.shape
    fmt: Format = spec.format
    tile = tile_of(spec.granularity, rows, cols)
    scale = empty_grid((rows, cols), tile)
    zero = empty_grid((rows, cols), tile) if fmt.zero_kind else None
    codes = torch.empty((rows, cols), dtype=torch.uint8)
    for region in regions((rows, cols), tile):
        blocks = to_blocks(m, region)  # (n_blocks, block_size)
        qp = choose_qparams(blocks, spec, global_scale)
        from_blocks(fmt.quantize(blocks, qp), region, codes)
        grid_put(scale, region, qp.scale)
        if zero is not None:
            grid_put(zero, region, qp.zero)
    return codes, scale, zero


def pack_matrix(spec: QuantSpec, shape: tuple[int, ...], layout: str, codes: Tensor, scale: Tensor,
                zero: Tensor | None, global_scale: Tensor | None) -> QuantizedTensor:
    """Wrap the codes (rows, cols) uint8 and grids of a matrix view into a ``QuantizedTensor``."""
    return QuantizedTensor(spec, tuple(shape), layout, pack(codes.reshape(-1), spec.format.bits), scale, zero,
                           global_scale)


def quantize_weight(w: Tensor, spec: QuantSpec, layout: str = "rows", name: str = "weight") -> QuantizedTensor:
    """Round-to-nearest quantization of one weight tensor (any shape, any float dtype)."""
    m = matrix_view(w.detach().to(torch.float32), layout)  # (rows, cols)
    check_weight(m, spec, *m.shape, name)
    gscale = spec.format.global_scale(m)
    codes, scale, zero = quantize_matrix(m, spec, gscale)
    return pack_matrix(spec, tuple(w.shape), layout, codes, scale, zero, gscale)
