"""HQQ's zero-point optimizer (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Models").

HQQ keeps the min-max scale and moves each block's float zero to minimize an ``l_p`` (p < 1)
norm of the reconstruction error, which tolerates a few large outliers. The half-quadratic
splitting alternates two closed-form steps, with ``W_e`` the error it tolerates::

    W_e  = shrink_p(W − Ŵ(z), β)            (generalized soft-thresholding)
    z    = mean over the block of (W − W_e − s·q)     (the float zero, in weight units)
    β   ← κ·β

Defaults are those of the HQQ reference (``lp_norm`` 0.7, β 10, κ 1.01, 20 iterations, stop
when the mean absolute error stops improving). Two details are lowbit's: the early stop is
per block (the reference stops the whole tensor at once), and the zero is written in weight
units ``x̂ = s·q + m`` (the reference's ``x̂ = (q − z)/s'`` is the same with ``m = −s·z``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.base import Format, QParams

LP_NORM, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20


def shrink_lp(x: Tensor, beta: float, p: float = LP_NORM) -> Tensor:
    """Proximal step of ``|x|^p``: ``sign(x)·max(|x| − |x|^(p−1)/β, 0)``."""
    ax = x.abs()
    return torch.sign(x) * torch.relu(ax - ax.clamp_min(1e-12).pow(p - 1) / beta)


def hqq_zero(blocks: Tensor, fmt: Format, qp: QParams, iters: int = ITERS, beta: float = BETA,
             kappa: float = KAPPA, p: float = LP_NORM) -> QParams:
    """Refine the float zero of ``qp`` for ``blocks`` (n_blocks, block_size) float32.

    ``fmt`` must reconstruct as ``x̂ = s·q + zero`` (a float-zero format); the scale is kept.
    Returns QParams with the best zero found per block, (n_blocks, 1) float32.
    """
    scale_only = QParams(qp.scale, torch.zeros_like(qp.zero), qp.global_scale)
    best_zero = qp.zero
    best_err = _error(blocks, fmt, qp)
    zero = qp.zero
    for _ in range(iters):
        cur = QParams(qp.scale, zero, qp.global_scale)
        q = fmt.quantize(blocks, cur)
        w_e = shrink_lp(blocks - fmt.dequantize(q, cur), beta, p)
        zero = (blocks - w_e - fmt.dequantize(q, scale_only)).mean(dim=1, keepdim=True)
        beta *= kappa
        err = _error(blocks, fmt, QParams(qp.scale, zero, qp.global_scale))
        better = err < best_err
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.where(better, err, best_err)
    return QParams(qp.scale, best_zero, qp.global_scale)


def _error(blocks: Tensor, fmt: Format, qp: QParams) -> Tensor:
    """(n_blocks, 1) mean absolute reconstruction error."""
    return (fmt.dequantize(fmt.quantize(blocks, qp), qp) - blocks).abs().mean(dim=1, keepdim=True)
