"""SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs", arXiv:2309.05516): learned rounding offsets and clipping multipliers.

Per weight ``x`` of a (rows, cols) float32 matrix view, with its block's scale ``s`` (and zero
``z``), the quantized weight is the format's own rounding of the shifted weight::

    x̃ = x + v·s,    v ∈ [-0.5, 0.5] per weight        (int grids: round(x/s + v); NVFP4: s·g)
    x̂ = dequantize(quantize(x̃; s, z); s, z)

and the block's covered range ``[lo, hi]`` is shrunk by two multipliers per block, ``α`` on the
top end and ``β`` on the bottom end, each in ``[clip_min, 1]``, from the start's range
``[lo₀, hi₀]`` (the reconstructions of the grid's two end codes):

=================  =====================================================================
zero point         the scale and zero the multipliers give
=================  =====================================================================
none (symmetric)   ``s = α·s₀`` (one multiplier: the grid is centred on 0)
integer            ``s = s₀·(α·hi₀ − β·lo₀)/(hi₀ − lo₀)``, ``z = clamp(round(−β·lo₀/s), 0, qmax)``
float              the same ``s``, ``z = β·lo₀`` (the block minimum, shrunk)
=================  =====================================================================

so that ``v = 0, α = β = 1`` is the start bit for bit (round-to-nearest, HQQ's zero for ``:hqq``
specs, or GPTQ's grids). The scale is rounded to its storage dtype in the forward (fp16, bf16,
NVFP4's e4m3), the rounding passed straight through, as are the integer zero's rounding and a
float zero's rounding to the scale dtype. MX formats keep
their power-of-two scales (a multiplier would leave the e8m0 grid): only ``v`` is learned there.

Gradients (``_Round``): straight through the rounding inside the range (identity for ``x̃``,
LSQ's ``(x̂ − x̃)/s`` for the scale), the fixed-code derivatives outside it (the clamped level for
the scale; 1 for a float zero, −s for an integer zero). ``signed_step`` then moves each
parameter by ``lr`` times the sign of its gradient, as the paper does.

Guesses, stated: for non-uniform grids (NF4, minifloats, NVFP4, NUPES power grids) the offset is
added in the scaled domain as for integers (``x + v·s``), which is what auto-round does for its
float formats; the paper defines it on integers only. The multipliers' range ``[0.5, 1]`` is ours
(auto-round clamps to ``[0, 1]``); below half the range the grid is never better at ≥ 2 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.formats.base import QParams, safe_scale
from lowbit.observers import stored_qparams
from lowbit.grouping import Region, empty_grid, from_blocks, grid_put, grid_take, regions, to_blocks
from lowbit.qat.fakequant import level_codes, store_scale
from lowbit.spec import QuantSpec, tile_of


@dataclass
class Start:
    """The grids rounding starts from, for a (rows, cols) matrix: ``scale`` / ``zero``
    (grid_rows, grid_cols) float32 as ``quantize_matrix`` returns them, and ``global_scale``."""

    scale: Tensor
    zero: Tensor | None
    global_scale: Tensor | None


def learns_clip(spec: QuantSpec) -> bool:
    """Whether the clipping multipliers can move this format's scale (not MX's e8m0 scales)."""
    return spec.format.family != "mx"


def clip_params(spec: QuantSpec, start: Start) -> tuple[Tensor | None, Tensor | None]:
    """The initial multipliers (α, β) as grids of ones; β only for formats with a zero point,
    neither for MX."""
    if not learns_clip(spec):
        return None, None
    ones = torch.ones_like(start.scale)
    return ones, (ones.clone() if spec.format.zero_kind else None)


class _Round(torch.autograd.Function):
    """Forward: the exact reconstruction ``xq`` of ``x̃`` (n_blocks, block_size). Backward: the
    straight-through gradients of the module docstring for ``x̃``, ``s`` (n_blocks, 1) and ``z``
    (n_blocks, 1) or None. ``inside`` is 1.0 where ``x̃`` lies in the grid's range and 0.0 outside
    (float32: masks of bools cost several times more per element on the CPU). ``zf`` is the float
    zero (n_blocks, 1), or 0: ``x̂`` at scale 0, so that the fixed-code scale derivative outside the
    range is ``(x̂ − zf)/s``."""

    @staticmethod
    def forward(ctx, xt: Tensor, s: Tensor, z: Tensor | None, xq: Tensor, inside: Tensor, zf: Tensor | float,
                zero_kind: str | None) -> Tensor:
        # what the backward needs, formed once: the scale derivative's factor per weight,
        # x̂ − (x̃ inside, zf outside); the products by 1.0 and 0.0 are exact
        at = xt * inside if isinstance(zf, float) and zf == 0 else xt * inside + zf * (1 - inside)
        ctx.save_for_backward(s, xq - at, inside)
        ctx.zero_kind = zero_kind if z is not None else None
        return xq

    @staticmethod
    def backward(ctx, grad: Tensor):
        s, dscale, inside = ctx.saved_tensors
        gx = grad * inside
        safe = safe_scale(s)
        gs = (grad * dscale).sum(dim=1, keepdim=True) / safe
        gz = None
        if ctx.zero_kind is not None:  # only clamped weights move with the zero
            outside = (grad - gx).sum(dim=1, keepdim=True)
            gz = outside if ctx.zero_kind == "float" else -s * outside
        return gx, gs, gz, None, None, None, None


def _ste(x: Tensor, value: Tensor) -> Tensor:
    """``value`` in the forward, the gradient of ``x`` in the backward."""
    return x + (value - x).detach()


def _qparams(spec: QuantSpec, s0: Tensor, z0: Tensor | None, g: Tensor | None,
             alpha: Tensor | None, beta: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(scale, zero) of one region's blocks, each (n_blocks, 1), from the start and the multipliers;
    differentiable in ``alpha`` / ``beta``, rounded to storage in the forward."""
    fmt = spec.format
    if alpha is None:
        return s0, z0
    if fmt.zero_kind is None:
        return _ste(s0 * alpha, store_scale(s0 * alpha, spec)), None
    lo_code, hi_code, _ = level_codes(fmt)
    ends = torch.tensor([[lo_code, hi_code]], dtype=torch.uint8).expand(s0.shape[0], 2)
    ends = fmt.dequantize(ends, QParams(s0, z0, g))  # (n_blocks, 2)
    lo0, hi0 = ends[:, :1], ends[:, 1:]
    width = hi0 - lo0
    ratio = torch.where(width > 0, (alpha * hi0 - beta * lo0) / torch.where(width > 0, width, 1.0), alpha)
    s = _ste(s0 * ratio, store_scale(s0 * ratio, spec))
    if fmt.zero_kind == "float":
        z = beta * lo0
        return s, _ste(z, stored_qparams(QParams(s.detach(), z.detach()), spec).zero)
    safe = safe_scale(s)
    u = -beta * lo0 / safe
    return s, _ste(u, torch.round(u.detach()).clamp(0, fmt.qmax))


def _round_region(x: Tensor, spec: QuantSpec, region: Region, start: Start, v: Tensor, alpha: Tensor | None,
                  beta: Tensor | None, codes_too: bool = False) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One region: (reconstruction (n_blocks, block_size), scale, zero, codes or None),
    differentiable; the uint8 codes only with ``codes_too`` (training needs the reconstruction only)."""
    fmt = spec.format
    g = start.global_scale
    s0 = grid_take(start.scale, region)
    z0 = None if start.zero is None else grid_take(start.zero, region)
    a = None if alpha is None else grid_take(alpha, region)
    b = None if beta is None else grid_take(beta, region)
    s, z = _qparams(spec, s0, z0, g, a, b)
    step = s if g is None else s * g  # one grid unit (NVFP4: the block scale times the tensor scale)
    xt = to_blocks(x, region) + to_blocks(v, region) * step  # (n_blocks, block_size)
    qp = QParams(s.detach(), None if z is None else z.detach(), g)
    xd = xt.detach()
    codes = fmt.quantize(xd, qp) if codes_too else None
    xq = fmt.dequantize(codes, qp) if codes_too else fmt.fake_quantize(xd, qp)
    lo_code, hi_code, _ = level_codes(fmt)
    ends = fmt.dequantize(torch.tensor([[lo_code, hi_code]], dtype=torch.uint8).expand(xq.shape[0], 2), qp)
    # 1.0 where lo <= x̃ <= hi, else 0.0: x̃ equals its clamp exactly there, so the difference is 0
    inside = (xd - xd.clamp(ends.amin(dim=1, keepdim=True), ends.amax(dim=1, keepdim=True))).abs_().sign_()
    inside = inside.neg_().add_(1)
    zf = qp.zero if fmt.zero_kind == "float" else 0.0
    out = _Round.apply(xt, s, z, xq, inside, zf, fmt.zero_kind)
    return out, qp.scale, qp.zero, codes


def signround_quantize(W: Tensor, spec: QuantSpec, start: Start, v: Tensor, alpha: Tensor | None = None,
                       beta: Tensor | None = None) -> Tensor:
    """The fake-quantized (rows, cols) float32 matrix for offsets ``v`` (rows, cols) and multipliers
    ``alpha`` / ``beta`` (grid_rows, grid_cols) or None; differentiable in the three."""
    rows, cols = W.shape
    out = torch.empty((rows, cols), dtype=torch.float32)
    for region in regions((rows, cols), tile_of(spec.granularity, rows, cols)):
        xq = _round_region(W, spec, region, start, v, alpha, beta)[0]
        from_blocks(xq, region, out)
    return out


@torch.no_grad()
def signround_codes(W: Tensor, spec: QuantSpec, start: Start, v: Tensor, alpha: Tensor | None = None,
                    beta: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """What is stored: codes (rows, cols) uint8 and the scale / zero grids (the stored values)."""
    rows, cols = W.shape
    tile = tile_of(spec.granularity, rows, cols)
    codes = torch.empty((rows, cols), dtype=torch.uint8)
    scale = empty_grid((rows, cols), tile)
    zero = None if start.zero is None else empty_grid((rows, cols), tile)
    for region in regions((rows, cols), tile):
        _, s, z, c = _round_region(W, spec, region, start, v, alpha, beta, codes_too=True)
        from_blocks(c, region, codes)
        grid_put(scale, region, s)
        if zero is not None:
            grid_put(zero, region, z)
    return codes, scale, zero


@torch.no_grad()
def signed_step(params: list[tuple[Tensor, float, float]], lr: float) -> None:
    """One signed-gradient step in place: ``p ← clamp(p − lr·sign(∂L/∂p), lo, hi)`` for each
    ``(p, lo, hi)``; parameters without a gradient are left."""
    for p, lo, hi in params:
        if p.grad is not None:
            p.sub_(lr * torch.sign(p.grad)).clamp_(lo, hi)
