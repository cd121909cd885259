"""Data-free exponent search for the NUPES / PowerQuant power quantizer (Yvinec, Dapogny, Bailly,
"NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search", arXiv:2308.05600).

PowerQuant picks the exponent ``a`` of :class:`lowbit.formats.grid.PowerFormat` by minimizing
the reconstruction error ``||W − D(Q_a(W))||²``; the paper proves it locally convex with a
unique minimum, so a 1-D golden-section search is enough. The error is measured through the
public path (``quantize_weight``), i.e. with the scale rounded to its storage dtype exactly
as it will be saved. NUPES's data-driven mode (learning ``a`` by gradient descent on
calibration data) is in :mod:`lowbit.algorithms.nupes_data`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.grid import PowerFormat
from lowbit.qtensor import QuantizedTensor
from lowbit.quantizer import quantize_weight
from lowbit.spec import Granularity, QuantSpec

_INVPHI = (math.sqrt(5) - 1) / 2  # 0.618...


def reconstruction_error(weight: Tensor, bits: int, a: float, granularity: Granularity,
                         scale_dtype: str = "float16") -> float:
    """``||W − D(Q_a(W))||²`` (float64 sum) of ``weight`` under ``PowerFormat(bits, a)``."""
    spec = QuantSpec(PowerFormat(bits, a), granularity, scale_dtype=scale_dtype)
    w_hat = quantize_weight(weight, spec).dequantize()
    return float((weight.detach().double() - w_hat.double()).pow(2).sum())


def search_exponent(weight: Tensor, bits: int, granularity: Granularity, lo: float = 0.2,
                    hi: float = 1.0, tol: float = 1e-3, scale_dtype: str = "float16") -> float:
    """The exponent ``a`` in ``[lo, hi]`` that minimizes the reconstruction error.

    Golden-section search down to an interval of width ``tol`` (about
    ``log(tol/(hi-lo)) / log(0.618)`` evaluations, 14 for the defaults); the end points are
    evaluated too and the best evaluated ``a`` is returned, so a boundary optimum (``a = 1``,
    uniform) is found exactly.
    """
    if not 0 < lo < hi <= 1:
        raise LowbitError(f"exponent interval [{lo}, {hi}] is not allowed; use 0 < lo < hi <= 1")
    if tol <= 0:
        raise LowbitError(f"tol {tol} must be positive")
    seen: dict[float, float] = {}

    def f(a: float) -> float:
        if a not in seen:
            seen[a] = reconstruction_error(weight, bits, a, granularity, scale_dtype)
        return seen[a]

    f(lo), f(hi)
    left, right = lo, hi
    c, d = right - _INVPHI * (right - left), left + _INVPHI * (right - left)
    while right - left > tol:
        if f(c) <= f(d):  # the minimum lies in [left, d]
            right, d = d, c
            c = right - _INVPHI * (right - left)
        else:  # the minimum lies in [c, right]
            left, c = c, d
            d = left + _INVPHI * (right - left)
    return min(seen, key=lambda a: (seen[a], a))


def exponent_curve(weight: Tensor, bits: int, granularity: Granularity, grid: Tensor,
                   scale_dtype: str = "float16") -> Tensor:
    """Reconstruction error at every exponent of ``grid`` (1-D), as a float64 tensor."""
    errs = [reconstruction_error(weight, bits, float(a), granularity, scale_dtype) for a in grid]
    return torch.tensor(errs, dtype=torch.float64)


def nupes(weight: Tensor, spec: QuantSpec, layout: str = "rows", name: str = "weight") -> QuantizedTensor:
    """Data-free NUPES: search this tensor's exponent, then quantize to ``PowerFormat(bits, a)``.

    ``spec.format`` gives the bit width (a power or a symmetric int format); the exponent is
    searched on the weight's matrix view at the spec's granularity and recorded in the
    returned tensor's spec, so every tensor carries its own ``a``.
    """
    from dataclasses import replace

    from lowbit.qtensor import matrix_view

    fmt = spec.format
    if not (isinstance(fmt, PowerFormat) or (fmt.family == "int" and fmt.symmetric)):
        raise LowbitError(f"method nupes needs a power or symmetric int format, not {fmt.name}; try pow4_a0.5:g64")
    m = matrix_view(weight.detach().float(), layout)
    a = search_exponent(m, fmt.bits, spec.granularity, scale_dtype=spec.scale_dtype)
    return quantize_weight(weight, replace(spec, format=PowerFormat(fmt.bits, a)), layout, name)
