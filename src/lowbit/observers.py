"""How a block's scale and zero are chosen: min-max, a clipping search, HQQ's zero refinement.

Every rule sees ``blocks`` (n_blocks, block_size) float32 and returns :class:`QParams` with
(n_blocks, 1) float32 entries exactly as they will be stored. The order is fixed:

1. the scale is rounded to its storage dtype (``spec.scale_dtype``, or the format's own);
2. a zero point is fitted to that rounded scale (the format does it, given ``round_scale``);
3. a float zero is rounded to the storage dtype.

===========  ================================================================================
rule         per block
===========  ================================================================================
``minmax``   the format's own rule over the block's full range (``Format.choose_qparams``)
``mse``      every clipping ratio of ``MSE_RATIOS``; keep the one with the smallest
``lpP``      ``Σ |x̂ − x|^p`` (``mse`` is p = 2)
``hqq``      the min-max scale; the float zero refined by HQQ's half-quadratic solver
===========  ================================================================================

HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Models",
https://mobiusml.github.io/hqq_blog/) keeps the min-max scale and moves each block's float zero to
minimize an ``l_p`` (p < 1) norm of the reconstruction error, which tolerates a few large
outliers. The half-quadratic splitting alternates two closed-form steps, with ``W_e`` the error it
tolerates::

    W_e  = shrink_p(W − Ŵ(z), β)                  (generalized soft-thresholding)
    z    = mean over the block of (W − W_e − s·q)     (the float zero, in weight units)

This follows the reference's default solver (``optimize_weights_proximal_legacy`` in hqq 0.2.8,
defaults ``lp_norm`` 0.7, β 10, 20 iterations) step for step:

* the start is the min-max scale with the zero rounded so that 0 lies on the grid
  (``m = −s·round(−min/s)``; the reference's ``round_zero``). The reference's
  ``BaseQuantizeConfig`` turns it on at 4 bits only; lowbit rounds at every width (``round_zero``),
  which at 3 bits g64 on SmolLM2 gives perplexity 47.4 where the ``hqq`` package gives 127.9
  (``bench/gptq.py``, BENCHMARKS.md);
* β stays fixed (the paper's β ← κ·β is in the reference's experimental solver only);
* the loop stops at the first step whose mean absolute error, over all the ``blocks`` given,
  is not lower than the best so far, and returns the zero that step computed (the reference
  breaks after its update). That last update re-fits each block's zero to its codes, which
  leaves the blocks nearly unbiased (mean error ~0; tested).

The zero is written in weight units ``x̂ = s·q + m``; the reference's ``x̂ = (q − z)/s'`` is the
same with ``s = 1/s'`` and ``m = −s·z``. lowbit runs the solver with the scale already rounded
to its storage dtype (the reference optimizes with the float scale and casts both afterwards).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.formats.base import Format, QParams
from lowbit.qtensor import round_scale, scale_storage
from lowbit.spec import SCALE_DTYPES, QuantSpec, search_norm

#: Clipping ratios tried by a scale search: 1.00, 0.99, ..., 0.80, as llm-compressor's MSE
#: observer does (1% steps, at most 20% shrink). Measured on SmolLM2-135M (bench/presets.py):
#: shrinking down to 0.40 lowered weight error but raised perplexity.
MSE_RATIOS = tuple(round(1.0 - 0.01 * i, 2) for i in range(21))

#: HQQ's solver: the ``l_p`` norm, the fixed β and the iteration cap of the reference defaults.
LP_NORM, BETA, ITERS = 0.7, 10.0, 20


def scale_rounding(spec: QuantSpec) -> Callable[[Tensor], Tensor]:
    """float32 scales -> float32 scales as ``spec`` stores them (see ``qtensor.round_scale``)."""
    storage = scale_storage(spec)
    return lambda scale: round_scale(scale, storage)


def stored_qparams(qp: QParams, spec: QuantSpec) -> QParams:
    """Round the scale and a float zero to their storage dtype, as they will be saved.

    Idempotent: a scale that ``choose_qparams`` already rounded stays as it is.
    """
    scale = round_scale(qp.scale, scale_storage(spec))
    zero = qp.zero
    if zero is not None and spec.format.zero_kind == "float":
        dt = SCALE_DTYPES[spec.scale_dtype]
        zero = zero.clamp(-torch.finfo(dt).max, torch.finfo(dt).max).to(dt).to(torch.float32)
    return QParams(scale, zero, qp.global_scale)


def minmax(blocks: Tensor, spec: QuantSpec, global_scale: Tensor | None = None, clip: float = 1.0) -> QParams:
    """The format's own rule over ``clip`` times the blocks' range, stored (zero fitted after rounding)."""
    qp = spec.format.choose_qparams(blocks, clip, global_scale, round_scale=scale_rounding(spec))
    return stored_qparams(qp, spec)


def clip_search(blocks: Tensor, spec: QuantSpec, p: float, global_scale: Tensor | None = None) -> QParams:
    """Per block, the ``MSE_RATIOS`` clip with the smallest ``Σ |x̂ − x|^p`` (first one on ties)."""
    fmt = spec.format
    best, best_err = None, None
    for ratio in MSE_RATIOS:
        qp = minmax(blocks, spec, global_scale, ratio)
        err = (fmt.dequantize(fmt.quantize(blocks, qp), qp) - blocks).abs().pow(p).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = qp, err
            continue
        better = err < best_err  # (n_blocks, 1)
        best_err = torch.where(better, err, best_err)
        zero = None if qp.zero is None else torch.where(better, qp.zero, best.zero)
        best = QParams(torch.where(better, qp.scale, best.scale), zero, qp.global_scale)
    return best


def shrink_lp(x: Tensor, beta: float, p: float = LP_NORM) -> Tensor:
    """Proximal step of ``|x|^p``: ``sign(x)·max(|x| − |x|^(p−1)/β, 0)``."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def hqq_zero(blocks: Tensor, fmt: Format, qp: QParams, iters: int = ITERS, beta: float = BETA,
             p: float = LP_NORM, round_zero: bool = True) -> QParams:
    """Refine the float zero of ``qp`` for ``blocks`` (n_blocks, block_size) float32.

    ``fmt`` must reconstruct as ``x̂ = s·q + zero`` (a float-zero format) and ``qp`` hold its
    min-max qparams (the scale as it will be stored); the scale is kept. ``round_zero`` first
    moves the zero onto a multiple of the scale, so that 0 is on the grid. Returns QParams with
    the refined zero, (n_blocks, 1) float32.
    """
    zero = qp.zero
    if round_zero:
        zero = torch.where(qp.scale > 0, -torch.round(-zero / qp.scale) * qp.scale, zero)
    scale_only = QParams(qp.scale, torch.zeros_like(zero), qp.global_scale)
    best = float("inf")
    for _ in range(iters):
        cur = QParams(qp.scale, zero, qp.global_scale)
        q = fmt.quantize(blocks, cur)
        residual = blocks - fmt.dequantize(q, cur)
        err = float(residual.abs().mean())
        w_e = shrink_lp(residual, beta, p)
        zero = (blocks - w_e - fmt.dequantize(q, scale_only)).mean(dim=1, keepdim=True)
        if not err < best:
            break
        best = err
    return QParams(qp.scale, zero, qp.global_scale)


def choose_qparams(blocks: Tensor, spec: QuantSpec, global_scale: Tensor | None = None) -> QParams:
    """Per-block qparams for ``blocks`` (n_blocks, block_size) float32 under ``spec.scale_search``."""
    if spec.scale_search == "hqq":
        start = spec.format.choose_qparams(blocks, 1.0, global_scale, round_scale=scale_rounding(spec))
        return stored_qparams(hqq_zero(blocks, spec.format, start), spec)  # solved with the stored scale
    p = search_norm(spec.scale_search)
    if p is None:
        return minmax(blocks, spec, global_scale)
    return clip_search(blocks, spec, p, global_scale)
