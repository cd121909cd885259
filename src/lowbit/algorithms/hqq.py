"""HQQ's zero-point optimizer (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Models").

HQQ keeps the min-max scale and moves each block's float zero to minimize an ``l_p`` (p < 1)
norm of the reconstruction error, which tolerates a few large outliers. The half-quadratic
splitting alternates two closed-form steps, with ``W_e`` the error it tolerates::

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
same with ``s = 1/s'`` and ``m = −s·z``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.base import Format, QParams

LP_NORM, BETA, ITERS = 0.7, 10.0, 20


def shrink_lp(x: Tensor, beta: float, p: float = LP_NORM) -> Tensor:
    """Proximal step of ``|x|^p``: ``sign(x)·max(|x| − |x|^(p−1)/β, 0)``."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def hqq_zero(blocks: Tensor, fmt: Format, qp: QParams, iters: int = ITERS, beta: float = BETA,
             p: float = LP_NORM, round_zero: bool = True) -> QParams:
    """Refine the float zero of ``qp`` for ``blocks`` (n_blocks, block_size) float32.

    ``fmt`` must reconstruct as ``x̂ = s·q + zero`` (a float-zero format) and ``qp`` hold its
    min-max qparams; the scale is kept. ``round_zero`` first moves the zero onto a multiple of
    the scale, so that 0 is on the grid. Returns QParams with the refined zero, (n_blocks, 1)
    float32.
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
