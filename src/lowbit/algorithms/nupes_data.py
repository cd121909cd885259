"""NUPES data-driven mode (Yvinec, Dapogny, Bailly, "NUPES: Non-Uniform Post-Training Quantization
via Power Exponent Search", arXiv:2308.05600): the power quantizer of
:class:`lowbit.formats.grid.PowerFormat` made differentiable in its exponent ``a`` and in a free
offset per weight, so that both can be learned by gradient on calibration data.

For a (rows, cols) float32 matrix view ``W`` with fixed block scales ``S`` (the data-free
solution's, ``absmax·clip`` rounded to storage; they do not depend on ``a``), ``qmax = 2^(b-1) - 1``::

    t  = sign(w) · (|w| / S)^a · qmax                  the power domain, float64, exactly as
                                                       PowerFormat.quantize computes it
    q  = clamp(round(t + v), -qmax, qmax)              v: a float offset per weight, in levels
    x̂  = S · sign(q) · (|q| / qmax)^(1/a)              PowerFormat(bits, a).dequantize, exactly

The forward value is the stored reconstruction bit for bit (``v = 0`` and the start's ``a`` give
the data-free codes). The gradients (``power_fake_quantize``) are surrogates, each chosen by us:

==============  ===================================================================================
variable        gradient of x̂
==============  ===================================================================================
``v``           the grid's local spacing ``(x̂(q+1) − x̂(q−1)) / 2`` (one-sided at ±qmax): rounding
                passed straight through as a step of one level. It is never zero, so a weight on
                code 0 can leave it, and ``v`` is unbounded, so a weight can travel to any level
                ("over the entire quantized space", not only up or down as in AdaRound); the
                caller keeps ``t + v`` within ``[-qmax - 0.5, qmax + 0.5]`` (``offset_bounds``).
``a``           LSQ's rule carried over to the exponent: the derivative of ``x̂`` with the codes'
                rounding passed straight through, ``∂x̂/∂a|_q + ∂x̂/∂q · ∂t/∂a``, evaluated at the
                rounded ``q``. It is proportional to the rounding residual (with ``q = t`` it is
                exactly zero, as ``D_a(Q_a(w)) = w`` then), so ``a`` moves to where the levels
                fit the weights that matter to the loss. ``|w|/S`` and ``|q|`` are clamped to
                ``EPS`` before the logarithms the powers' derivatives take (the dossier's
                ``|x| + ε``).
==============  ===================================================================================

The exponent is parametrised for stability as ``a = a₀ + σ(θ₀ + u) − σ(θ₀)``, clamped to
``[A_MIN, 1]``, with ``θ₀ = logit(a₀)`` (``a₀`` clamped to [0.01, 0.99] there) and ``u``
learned from 0: the dossier's ``a = sigmoid(θ)``, shifted so that ``u = 0`` gives the start's
``a₀`` exactly. NUPES's own parametrisation is not in the abstract: ours is a guess, as are the
two surrogate gradients and ``A_MIN``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.formats.base import QParams, safe_scale
from lowbit.formats.grid import PowerFormat
from lowbit.grouping import from_blocks, grid_take, regions, to_blocks
from lowbit.spec import QuantSpec, tile_of

#: the smallest exponent the learned ``a`` may take (a guess; the data-free search starts at 0.2)
A_MIN = 0.05
#: the floor of ``|w|/S`` and ``|q|`` under the powers' logarithms
EPS = 1e-30


def logit_start(a0: float) -> float:
    """θ₀ = logit(a₀), with a₀ clamped to [0.01, 0.99] (a₀ = 1, uniform, has no finite logit)."""
    p = min(max(a0, 0.01), 0.99)
    return math.log(p / (1 - p))


def exponent(u: Tensor, a0: float) -> Tensor:
    """The exponent ``a`` (0-dim float64, differentiable in ``u``) for the offset ``u`` (0-dim)."""
    theta0 = logit_start(a0)
    shift = torch.sigmoid(u.to(torch.float64) + theta0) - torch.sigmoid(torch.tensor(theta0, dtype=torch.float64))
    return (a0 + shift).clamp(A_MIN, 1.0)


def _region(W: Tensor, spec: QuantSpec, scale: Tensor, region, a: float, v: Tensor | None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, QParams]:
    """One region: blocks x (n, bs) float32, power-domain t (n, bs) float64, signed levels q
    (n, bs) float64, codes (n, bs) uint8 and the qparams, for the exponent ``a``."""
    fmt = PowerFormat(spec.format.bits, a)
    x = to_blocks(W, region)  # (n_blocks, block_size)
    qp = QParams(grid_take(scale, region))
    t = fmt.power_domain(x, qp).copysign_(x)  # the format's own float64 arithmetic, signed
    q = t if v is None else t + to_blocks(v, region).to(torch.float64)
    q = q.round().clamp_(-fmt.qmax, fmt.qmax)  # ties to even, odd-symmetric: v = 0 is PowerFormat.quantize
    codes = (q + 2 ** (fmt.bits - 1)).to(torch.uint8)
    return x, t, q, codes, qp


def power_codes(W: Tensor, spec: QuantSpec, scale: Tensor, a: float, v: Tensor | None = None) -> Tensor:
    """Codes (rows, cols) uint8 on ``PowerFormat(bits, a)`` of W (rows, cols) float32 with the
    scale grid ``scale`` and offsets ``v`` (rows, cols) float32 or None."""
    codes = torch.empty(W.shape, dtype=torch.uint8)
    with torch.no_grad():
        for region in regions(tuple(W.shape), tile_of(spec.granularity, *W.shape)):
            from_blocks(_region(W, spec, scale, region, a, v)[3], region, codes)
    return codes


def offset_bounds(W: Tensor, spec: QuantSpec, scale: Tensor, a: float) -> tuple[Tensor, Tensor]:
    """(lo, hi) (rows, cols) float32: the offsets that keep ``t + v`` within half a level of the
    grid's ends, beyond which ``v`` no longer changes the code."""
    qmax = 2 ** (spec.format.bits - 1) - 1
    t = torch.empty(W.shape, dtype=torch.float32)
    with torch.no_grad():
        for region in regions(tuple(W.shape), tile_of(spec.granularity, *W.shape)):
            from_blocks(_region(W, spec, scale, region, a, None)[1].float(), region, t)
    return -qmax - 0.5 - t, qmax + 0.5 - t


def _levels(q: Tensor, s: Tensor, a: Tensor, qmax: int) -> Tensor:
    """``S · sign(q) · (|q| / qmax)^(1/a)`` (n, bs), differentiable in q and a."""
    return torch.sign(q.detach()) * s * (q.abs().clamp_min(EPS) / qmax) ** (1 / a)


def power_fake_quantize(W: Tensor, spec: QuantSpec, scale: Tensor, a: Tensor, v: Tensor) -> Tensor:
    """The reconstruction (rows, cols) float32 of W for the exponent ``a`` (0-dim float64 tensor)
    and offsets ``v`` (rows, cols) float32: exactly what ``power_codes`` stores (dequantized on
    ``PowerFormat(bits, float(a))``), with the surrogate gradients of the module docstring."""
    a_val = float(a.detach())
    fmt = PowerFormat(spec.format.bits, a_val)
    qmax, a32 = fmt.qmax, a.to(torch.float32)
    out = torch.empty(W.shape, dtype=torch.float32)
    for region in regions(tuple(W.shape), tile_of(spec.granularity, *W.shape)):
        x, _, q, codes, qp = _region(W, spec, scale, region, a_val, v.detach())
        exact = fmt.dequantize(codes, qp)  # (n_blocks, block_size) what is stored
        s, q32 = safe_scale(qp.scale), q.float()
        r = (x.abs() / s).clamp_min(EPS)  # (n_blocks, block_size)
        ta = r ** a32 * qmax * torch.sign(x)  # ∂t/∂a; its value is t up to float32 rounding
        moved = _levels(q32 + (ta - ta.detach()), qp.scale, a32, qmax)  # gradient in a only
        with torch.no_grad():
            up, down = (q32 + 1).clamp(-qmax, qmax), (q32 - 1).clamp(-qmax, qmax)
            spacing = (_levels(up, qp.scale, a32, qmax) - _levels(down, qp.scale, a32, qmax)) / (up - down)
        vb = to_blocks(v, region)
        grad_only = (moved - moved.detach()) + spacing * (vb - vb.detach())  # value: zeros
        from_blocks(exact + grad_only, region, out)
    return out
