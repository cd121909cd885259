"""Differentiable fake quantization through any registered format: STE and LSQ.

``fake_quantize(m, spec, ...)`` returns, for a ``(rows, cols)`` float32 matrix view, exactly the
reconstruction that post-training quantization stores (``format.dequantize(format.quantize(W))``
per block, bit for bit), with gradients defined as follows. Let ``x`` be a weight, ``s`` its block
scale, ``x̂`` its reconstruction and ``[lo, hi]`` the block's representable range (the
reconstructions of the smallest and largest grid values, so it covers zero points, float zeros
and NVFP4's tensor scale alike):

====================  ====================================================================
gradient              value
====================  ====================================================================
``∂x̂/∂x``             1 when ``lo <= x <= hi``, else 0: the straight-through estimator with
                      clipping (Bengio et al., "Estimating or Propagating Gradients Through
                      Stochastic Neurons", arXiv:1308.3432), as LSQ defines it too.
``∂x̂/∂s`` (inside)    ``(x̂ - x) / s``: LSQ's ``round(x/s) - x/s`` (Esser et al., "Learned Step
                      Size Quantization", arXiv:1902.08153, eq. 3), written for any grid: with
                      rounding passed straight through, ``d/ds [s·Q(x/s) + m] = Q(u) - u``.
``∂x̂/∂s`` (outside)   ``∂x̂/∂s`` at fixed codes: the clamped level, LSQ's ``-Q_N`` or ``Q_P``
                      (``dequantize(codes, scale=1) - dequantize(codes, scale=0)``).
====================  ====================================================================

The scale gradient is multiplied by LSQ's ``g = 1/sqrt(N·Q_P)``, with ``N`` the number of
weights sharing the scale (the block size; LSQ has one step per layer, so there N is the layer
size) and ``Q_P`` the number of positive levels (``qmax`` for integers, 7 for e2m1 and NF4;
asymmetric grids count every level but the lowest, LSQ's unsigned ``2^b - 1``).

Without a learned scale the qparams are the spec's own choice on the current weight (min-max,
clip search or HQQ, rounded to storage), recomputed on every call: the forward is what
``quantize_weight`` would store for this weight, and only the weight gets a gradient.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams, safe_scale
from lowbit.grouping import empty_grid, from_blocks, grid_put, grid_take, regions, to_blocks
from lowbit.qtensor import round_scale, scale_storage
from lowbit.quantizer import choose_qparams
from lowbit.spec import QuantSpec, tile_of

#: Format families whose block scale LSQ can learn: ``x̂ = s·v[code] (+ zero)`` with codes from
#: rounding ``x / s`` to the nearest grid value. NVFP4's e4m3 block scale is learned in float32
#: and rounded to e4m3 in the forward (the rounding passed straight through), as fp16 scales are.
LEARNABLE_FAMILIES = ("int", "float", "codebook", "power", "ternary", "nvfp4")
_REFUSED = {
    "mx": "MX stores power-of-two (e8m0) scales: a learned step would be rounded to a factor-of-two "
          "grid that small LSQ updates never cross",
    "binary": "binary codes are sign(x), independent of the scale, so LSQ's round-through gradient is "
              "undefined (its mean|x| scale is already the L2-optimal one)",
}
_E4M3_MAX, _E4M3_MIN = 448.0, 2.0**-9


def check_learnable(spec: QuantSpec, name: str = "weight") -> None:
    """Raise ``LowbitError`` when LSQ cannot learn the scale of ``spec``'s format."""
    family = spec.format.family
    if family in LEARNABLE_FAMILIES:
        return
    why = _REFUSED.get(family, f"format family {family!r} has no plain float block scale")
    raise LowbitError(f"{name}: cannot learn the scale of {spec.format.name}: {why}; use learn_scale=False "
                      f"(STE on the weights only) or a format of the families {', '.join(LEARNABLE_FAMILIES)}")


def store_scale(s: Tensor, spec: QuantSpec) -> Tensor:
    """Learned float32 scales -> the values their storage holds (fp16/bf16/fp32, or e4m3 for NVFP4).

    Negative scales (an over-large step) are clamped to zero, except for formats with
    ``signed_scale``, whose grid is valid at either sign; nonzero scales never round to zero.
    """
    s = s.detach() if spec.format.signed_scale else s.detach().clamp(min=0)
    storage = scale_storage(spec)
    if storage == "float8_e4m3fn":
        e4m3 = s.clamp(_E4M3_MIN, _E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
        return torch.where(s > 0, e4m3, torch.zeros_like(s))
    return round_scale(s, storage)


@functools.lru_cache(maxsize=256)
def level_codes(fmt: Format) -> tuple[int, int, int]:
    """(code of the smallest value, code of the largest value, Q_P) of ``fmt``'s element grid."""
    v = fmt.values()
    finite = torch.isfinite(v)
    lo = int(torch.where(finite, v, torch.inf).argmin())
    hi = int(torch.where(finite, v, -torch.inf).argmax())
    q_p = int((v[finite] > 0).sum()) if fmt.symmetric else int(finite.sum()) - 1
    return lo, hi, max(q_p, 1)


class _RoundThrough(torch.autograd.Function):
    """Forward: the exact reconstruction ``xq``. Backward: the STE mask for ``x`` and, when a
    scale is learned, ``sum_j grad·dxds`` per block for ``s`` (n_blocks, 1)."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor | None, xq: Tensor, inside: Tensor, dxds: Tensor | None) -> Tensor:
        ctx.save_for_backward(inside, dxds if dxds is not None else inside)
        return xq

    @staticmethod
    def backward(ctx, grad: Tensor):
        inside, dxds = ctx.saved_tensors
        gx = torch.where(inside, grad, torch.zeros_like(grad)) if ctx.needs_input_grad[0] else None
        gs = (grad * dxds).sum(dim=1, keepdim=True) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None


def fake_quantize_blocks(blocks: Tensor, spec: QuantSpec, qp: QParams, s: Tensor | None = None) -> Tensor:
    """Fake quantization of ``blocks`` (n_blocks, block_size) float32 with qparams ``qp``.

    ``qp.scale`` is what the forward uses (as stored); pass the learnable float32 scale ``s``
    (n_blocks, 1) to get LSQ's gradient for it. Returns (n_blocks, block_size) float32.
    """
    fmt = spec.format
    x = blocks.detach()
    codes = fmt.quantize(x, qp)
    xq = fmt.dequantize(codes, qp)
    lo_code, hi_code, q_p = level_codes(fmt)
    ends = torch.tensor([[lo_code, hi_code]], dtype=torch.uint8, device=x.device).expand(x.shape[0], 2)
    ends = fmt.dequantize(ends, qp)  # (n_blocks, 2) reconstructions of the grid's ends
    lo, hi = ends.amin(dim=1, keepdim=True), ends.amax(dim=1, keepdim=True)
    inside = (x >= lo) & (x <= hi)  # (n_blocks, block_size) bool
    dxds = None
    if s is not None:
        safe = safe_scale(qp.scale)
        at_fixed_codes = (fmt.dequantize(codes, QParams(torch.ones_like(qp.scale), qp.zero, qp.global_scale))
                          - fmt.dequantize(codes, QParams(torch.zeros_like(qp.scale), qp.zero, qp.global_scale)))
        g = 1.0 / math.sqrt(x.shape[1] * q_p)
        dxds = torch.where(inside, (xq - x) / safe, at_fixed_codes) * g
    return _RoundThrough.apply(blocks, s, xq, inside, dxds)


def fake_quantize(m: Tensor, spec: QuantSpec, scale: Tensor | None = None, zero: Tensor | None = None,
                  global_scale: Tensor | None = None) -> Tensor:
    """Fake quantization of a (rows, cols) float32 matrix view; differentiable (module docstring).

    scale: None (the spec's scale choice on ``m``, every call) or the learnable float32 scale
    grid (grid_rows, grid_cols) of ``lowbit.grouping``, with ``zero`` (same shape, or None) and
    ``global_scale`` (() or None) fixed beside it. Returns (rows, cols) float32.
    """
    rows, cols = m.shape
    tile = tile_of(spec.granularity, rows, cols)
    if scale is None and global_scale is None:
        global_scale = spec.format.global_scale(m.detach())
    out = torch.empty((rows, cols), dtype=torch.float32, device=m.device)
    for region in regions((rows, cols), tile):
        blocks = to_blocks(m, region)  # (n_blocks, block_size)
        if scale is None:
            with torch.no_grad():
                qp = choose_qparams(blocks.detach(), spec, global_scale)
            from_blocks(fake_quantize_blocks(blocks, spec, qp), region, out)
            continue
        s = grid_take(scale, region)  # (n_blocks, 1), carries the gradient
        z = None if zero is None else grid_take(zero, region)
        qp = QParams(store_scale(s, spec), z, global_scale)
        from_blocks(fake_quantize_blocks(blocks, spec, qp, s), region, out)
    return out


def initial_qparams(m: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The spec's own (scale grid, zero grid or None, global scale or None) for a (rows, cols)
    matrix, as ``quantize_matrix`` stores them: the starting point of a learned scale."""
    rows, cols = m.shape
    tile = tile_of(spec.granularity, rows, cols)
    m = m.detach().to(torch.float32)
    gscale = spec.format.global_scale(m)
    scale = empty_grid((rows, cols), tile).to(m.device)
    zero = empty_grid((rows, cols), tile).to(m.device) if spec.format.zero_kind else None
    for region in regions((rows, cols), tile):
        qp = choose_qparams(to_blocks(m, region), spec, gscale)
        grid_put(scale, region, qp.scale)
        if zero is not None:
            grid_put(zero, region, qp.zero)
    return scale, zero, gscale


def quantize_with(m: Tensor, spec: QuantSpec, scale: Tensor, zero: Tensor | None,
                  global_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Codes (rows, cols) uint8 and the stored scale grid for fixed (learned) qparams."""
    rows, cols = m.shape
    tile = tile_of(spec.granularity, rows, cols)
    m = m.detach().to(torch.float32)
    stored = store_scale(scale, spec)
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=m.device)
    for region in regions((rows, cols), tile):
        z = None if zero is None else grid_take(zero, region)
        qp = QParams(grid_take(stored, region), z, global_scale)
        from_blocks(spec.format.quantize(to_blocks(m, region), qp), region, codes)
    return codes, stored
