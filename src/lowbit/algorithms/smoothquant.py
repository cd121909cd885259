"""SmoothQuant's per-channel smoothing (Xiao et al., "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models", arXiv:2211.10438), as pure tensor math.

A linear layer ``Y = X W^T`` is unchanged when input channel j of X is divided by ``s_j`` and
column j of W multiplied by it. SmoothQuant picks (paper, eq. 4)::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

so that activation outliers move into the weights; ``alpha`` = 0.5 splits the difficulty evenly.
Several layers reading the same input (q/k/v, gate/up) share one ``s``: ``max|W_j|`` is then the
maximum over the rows of all of them. The division of X is folded into the preceding norm's
affine parameters, so the smoothed model has the same float function and no extra operation.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: Floor for the channel maxima before the powers (the paper's code clamps to 1e-5 as well).
FLOOR = 1e-5


def column_absmax(weights: list[Tensor]) -> Tensor:
    """max_i |W_ij| over the rows of every matrix: [(rows_k, cols)] float -> (cols,) float32."""
    if not weights:
        raise ValueError("column_absmax needs at least one matrix")
    return torch.stack([w.detach().abs().amax(0).to(torch.float32) for w in weights]).amax(0)


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """The smoothing factors s (cols,) float32 of one input shared by one or more layers.

    act_absmax:    (cols,) max|X_j| over every calibration token.
    weight_absmax: (cols,) max_i |W_ij| over the rows of every layer that reads X (``column_absmax``).
    alpha:         migration strength in [0, 1].

    Both maxima are floored at ``FLOOR`` before the powers. A channel whose activation or weight
    column is entirely zero gets s_j = 1: no scale can help it, and a tiny s_j would only blow up
    the folded norm weight (a guess of ours; the paper does not discuss dead channels).
    """
    a = act_absmax.to(torch.float32)
    w = weight_absmax.to(torch.float32)
    s = a.clamp(min=FLOOR).pow(alpha) / w.clamp(min=FLOOR).pow(1.0 - alpha)
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s)
