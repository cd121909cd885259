"""Hypothesis properties of integer formats over shapes, group sizes and bit widths.

Shapes: rows 1..9, cols 1..70; group sizes 1..cols (non-dividing ones give a partial last
group); bits 2..8; symmetric (full and narrow range), asymmetric with an integer zero,
asymmetric with a float zero.
"""
from __future__ import annotations

from math import ceil

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import grouping
from lowbit.formats.int import IntFormat
from lowbit.packing import pack, unpack
from lowbit.quantizer import quantize_weight
from lowbit.spec import PerGroup, QuantSpec

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(1, 70))
    group = draw(st.integers(1, cols))
    bits = draw(st.integers(2, 8))
    kind = draw(st.sampled_from(["sym", "narrow", "int", "float"]))
    fmt = IntFormat(bits, False, kind) if kind in ("int", "float") else IntFormat(bits, narrow_range=kind == "narrow")
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * spread + draw(st.sampled_from([0.0, 0.5 * spread]))
    return w, QuantSpec(fmt, PerGroup(group))


@SETTINGS
@given(cases())
def test_dequantize_shape_and_dtype(case):
    w, spec = case
    deq = quantize_weight(w, spec).dequantize()
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert torch.isfinite(deq).all()


@SETTINGS
@given(cases())
def test_error_within_half_step_inside_range(case):
    """With the stored scale s (and zero), the grid is uniform with step s."""
    w, spec = case
    fmt = spec.format
    qt = quantize_weight(w, spec)
    codes = qt.codes()
    for region in grouping.regions(qt.matrix_shape, qt.tile):
        x = grouping.to_blocks(w, region).double()
        qp = qt.qparams(region)
        xhat = fmt.dequantize(grouping.to_blocks(codes, region), qp).double()
        s = qp.scale.double()
        if fmt.symmetric:
            lo, hi = fmt.qmin * s, fmt.qmax * s
        elif fmt.zero == "int":
            lo, hi = -qp.zero * s, (fmt.qmax - qp.zero) * s
        else:
            lo, hi = qp.zero.double(), qp.zero.double() + fmt.qmax * s
        inside = (x >= lo) & (x <= hi)
        eps = 1e-6 * (x.abs() + xhat.abs() + s)
        assert ((x - xhat).abs() <= s / 2 + eps)[inside].all()


@SETTINGS
@given(cases())
def test_bits_per_weight_accounting(case):
    w, spec = case
    fmt, (rows, cols), size = spec.format, w.shape, spec.granularity.size
    qt = quantize_weight(w, spec)
    n_groups = rows * ceil(cols / size)
    zero_bits = {None: 0, "int": fmt.bits, "float": 16}[fmt.zero_kind]
    want = rows * cols * fmt.bits + n_groups * 16 + n_groups * zero_bits
    assert qt.nbits() == want
    assert qt.bits_per_weight() == want / (rows * cols)
    assert qt.packed.numel() == ceil(rows * cols * fmt.bits / 8)


@SETTINGS
@given(cases())
def test_packing_round_trip(case):
    w, spec = case
    qt = quantize_weight(w, spec)
    codes = qt.codes().reshape(-1)
    assert torch.equal(pack(codes, spec.format.bits), qt.packed)
    assert torch.equal(unpack(qt.packed, spec.format.bits, codes.numel()), codes)
    assert int(codes.max()) < 2**spec.format.bits


@SETTINGS
@given(cases())
def test_quantize_weight_equals_blockwise_format_calls(case):
    """The public path is exactly choose_qparams -> storage rounding -> quantize per block."""
    w, spec = case
    fmt = spec.format
    qt = quantize_weight(w, spec)
    for region in grouping.regions(qt.matrix_shape, qt.tile):
        blocks = grouping.to_blocks(w, region)
        qp = qt.qparams(region)
        assert torch.equal(fmt.quantize(blocks, qp), grouping.to_blocks(qt.codes(), region))
