"""lowbit.observers: HQQ's zero optimizer against the reference's own update written in its units,
its guarantees, and the order "round the scale, then fit the zero"."""
from __future__ import annotations

import pytest
import torch

from lowbit.formats import QParams
from lowbit.observers import BETA, ITERS, LP_NORM, MSE_RATIOS, hqq_zero, scale_rounding, stored_qparams
from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.quantizer import choose_qparams, quantize_weight
from lowbit.schemes import parse_scheme


def blocks(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 32, generator=g) * 0.02
    x[::5, 3] *= 10  # outliers, which the l_p (p < 1) norm learns to ignore
    return x


def reference_zero(w: torch.Tensor, bits: int, round_zero: bool = True) -> torch.Tensor:
    """HQQ's default solver as its reference writes it (hqq 0.2.8 ``Quantizer.quantize`` with
    ``optimize_weights_proximal_legacy``): inverse scale s', zero z in code units,
    x̂ = (q − z)/s', a tensor-wide early stop that returns the zero of the step that stopped."""
    qmax = 2**bits - 1
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    s_inv = qmax / (hi - lo)
    z = -lo * s_inv
    if round_zero:
        z = torch.round(z)
    best = torch.tensor(float("inf"))
    for _ in range(ITERS):
        q = torch.round(w * s_inv + z).clamp(0, qmax)
        w_r = (q - z) / s_inv
        e = w - w_r
        w_e = torch.sign(e) * torch.relu(e.abs() - (1.0 / BETA) * e.abs().pow(LP_NORM - 1))
        z = torch.mean(q - (w - w_e) * s_inv, 1, keepdim=True)
        current = torch.abs(w - w_r).mean()
        if current < best:
            best = current
        else:
            break
    return -z / s_inv  # the same zero in weight units (x̂ = s·q + m)


@pytest.mark.parametrize("round_zero", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_zero_matches_the_reference_solver(bits, round_zero):
    x = blocks(bits)
    fmt = get_format(f"uint{bits}_fz")
    qp = hqq_zero(x, fmt, fmt.choose_qparams(x), round_zero=round_zero)
    ref = reference_zero(x, bits, round_zero)
    # float32 rounding in the two parametrizations can flip a code at a boundary and shift a
    # block's zero slightly: zeros agree within a fifth of a quantization step
    assert ((qp.zero - ref).abs() <= 0.2 * qp.scale).all()
    assert ((qp.zero - ref).abs() <= 1e-6).float().mean() > 0.8  # and most blocks to float precision


def test_hqq_round_zero_puts_zero_on_the_grid():
    x = blocks()
    fmt = get_format("uint4_fz")
    qp = hqq_zero(x, fmt, fmt.choose_qparams(x), iters=0)
    codes_of_zero = -qp.zero / qp.scale  # the code that reconstructs 0.0
    assert torch.allclose(codes_of_zero, codes_of_zero.round(), atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_hqq_leaves_blocks_less_biased_than_min_max(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 64, generator=g) * 0.02  # no outliers: W_e is 0 and the zero re-fits the mean
    fmt = get_format("uint4_fz")
    start = fmt.choose_qparams(x)
    bias = lambda q: (fmt.dequantize(fmt.quantize(x, q), q) - x).mean(1).abs().mean()  # noqa: E731
    assert bias(hqq_zero(x, fmt, start)) < 0.5 * bias(start)


def test_hqq_scale_search_through_a_spec_string():
    spec = parse_scheme("uint4_fz:g32:hqq")
    assert spec.scale_search == "hqq"
    x = blocks()
    qp = choose_qparams(x, spec)
    assert qp.zero.dtype == torch.float32 and torch.equal(qp.zero, qp.zero.half().float())  # stored as fp16
    qt = quantize_weight(x, spec)
    assert qt.dequantize().shape == x.shape


def test_hqq_needs_a_float_zero():
    with pytest.raises(LowbitError, match="hqq refines a float zero"):
        parse_scheme("uint4:g32:hqq")


# --- the zero is fitted after the scale is rounded to its storage dtype ----------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_integer_zero_is_fitted_to_the_stored_scale(dtype, search):
    """The stored zero puts the block minimum on the nearest point of the *stored* grid:
    ``zero == round(-min/s_stored)``. Fitted to the float32 scale instead (the order before this
    fix), some blocks get a zero one code off."""
    spec = parse_scheme(f"uint4:g64{':mse' if search == 'mse' else ''}:scale={dtype}")
    fmt = spec.format
    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    qp = choose_qparams(x, spec)
    assert torch.equal(qp.scale, qp.scale.to(getattr(torch, dtype)).float())
    if search == "minmax":
        lo = x.amin(1, keepdim=True).clamp(max=0)
        assert torch.equal(qp.zero, torch.round(-lo / qp.scale).clamp(0, 15))
        before = fmt.choose_qparams(x)  # float32 scale, zero fitted to it
        assert (before.zero != qp.zero).any()  # the order matters on these blocks
    else:  # every candidate of the search is fitted to its own stored scale
        lo = x.amin(1, keepdim=True)
        fitted = torch.zeros_like(qp.zero, dtype=torch.bool)
        for r in MSE_RATIOS:  # the kept (scale, zero) is a candidate whose zero fits its stored scale
            same = qp.scale == fmt.choose_qparams(x, r, round_scale=scale_rounding(spec)).scale
            fitted |= same & (qp.zero == torch.round(-(lo * r).clamp(max=0) / qp.scale).clamp(0, 15))
        assert fitted.all()


def test_hqq_zero_is_solved_with_the_stored_scale():
    """Under ``scale=bfloat16`` HQQ refines the zero for the scale as stored (rounded first). Its
    last step re-fits the zero to the codes, so the stored blocks are less biased than when the
    zero is solved with the float32 scale and the scale rounded afterwards."""
    spec = parse_scheme("uint4_fz:g64:hqq:scale=bfloat16")
    fmt = spec.format
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    qp = choose_qparams(x, spec)
    stored_scale = ((x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 15).to(torch.bfloat16).float()
    assert torch.equal(qp.scale, stored_scale)
    want = hqq_zero(x, fmt, QParams(stored_scale, x.amin(1, keepdim=True)))
    assert torch.equal(qp.zero, want.zero.to(torch.bfloat16).float())
    after = stored_qparams(hqq_zero(x, fmt, fmt.choose_qparams(x)), spec)  # the order before the fix
    bias = lambda q: (fmt.dequantize(fmt.quantize(x, q), q) - x).mean(1).abs().mean()  # noqa: E731
    assert bias(qp) < 0.9 * bias(after)
