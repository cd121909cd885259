"""Round a weight to a ``QuantSpec``: scale choice (min-max or MSE search) and packing.

This is the shared path of every algorithm: round-to-nearest calls it directly, and
calibrated algorithms call ``choose_qparams`` and the format's quantize/dequantize themselves.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit import grouping
from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams
from lowbit.packing import pack
from lowbit.qtensor import QuantizedTensor, matrix_view, round_scale, scale_storage
from lowbit.spec import SCALE_DTYPES, PerBlock, PerGroup, QuantSpec, search_norm, tile_of

#: Clipping ratios tried by a scale search: 1.00, 0.99, ..., 0.80, as llm-compressor's MSE
#: observer does (1% steps, at most 20% shrink). Measured on SmolLM2-135M (bench/presets.py):
#: shrinking down to 0.40 lowered weight error but raised perplexity.
MSE_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(21))


def stored_qparams(qp: QParams, spec: QuantSpec) -> QParams:
    """Round scale (and a float zero) to their storage dtype, as they will be saved."""
    scale = round_scale(qp.scale, scale_storage(spec))
    zero = qp.zero
    if zero is not None and spec.format.zero_kind == "float":
        dt = SCALE_DTYPES[spec.scale_dtype]
        zero = zero.clamp(-torch.finfo(dt).max, torch.finfo(dt).max).to(dt).to(torch.float32)
    return QParams(scale, zero, qp.global_scale)


def choose_qparams(blocks: Tensor, spec: QuantSpec, global_scale: Tensor | None = None) -> QParams:
    """Per-block qparams for ``blocks`` (n_blocks, block_size) float32, as stored.

    ``minmax`` covers each block's full range; ``mse`` / ``lpP`` try every ratio in
    ``MSE_RATIOS`` and keep, per block, the one with the smallest ``sum |x̂ - x|^p``; ``hqq``
    keeps the min-max scale and refines the float zero (``algorithms.hqq``).
    """
    fmt = spec.format
    p = search_norm(spec.scale_search)
    if spec.scale_search == "hqq":
        from lowbit.algorithms.hqq import hqq_zero

        return stored_qparams(hqq_zero(blocks, fmt, fmt.choose_qparams(blocks, 1.0, global_scale)), spec)
    if p is None:
        return stored_qparams(fmt.choose_qparams(blocks, 1.0, global_scale), spec)
    best, best_err = None, None
    for ratio in MSE_RATIOS:
        qp = stored_qparams(fmt.choose_qparams(blocks, ratio, global_scale), spec)
        err = (fmt.dequantize(fmt.quantize(blocks, qp), qp) - blocks).abs().pow(p).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = qp, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        zero = None if qp.zero is None else torch.where(better, qp.zero, best.zero)
        best = QParams(torch.where(better, qp.scale, best.scale), zero, qp.global_scale)
    return best


def check_weight(w: Tensor, spec: QuantSpec, rows: int, cols: int, name: str = "weight") -> None:
    """Raise ``LowbitError`` for non-finite weights or a granularity larger than the matrix."""
    if not torch.isfinite(w).all():
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
    scale = grouping.empty_grid((rows, cols), tile)
    zero = grouping.empty_grid((rows, cols), tile) if fmt.zero_kind else None
    codes = torch.empty((rows, cols), dtype=torch.uint8)
    for region in grouping.regions((rows, cols), tile):
        blocks = grouping.to_blocks(m, region)  # (n_blocks, block_size)
        qp = choose_qparams(blocks, spec, global_scale)
        grouping.from_blocks(fmt.quantize(blocks, qp), region, codes)
        grouping.grid_put(scale, region, qp.scale)
        if zero is not None:
            grouping.grid_put(zero, region, qp.zero)
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
