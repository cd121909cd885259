"""The clip search of float-zero formats (``uint4_fz``: zero = block minimum) shrinks a block's
range, it does not shift it."""
from __future__ import annotations

import pytest
import torch

from lowbit.formats import get_format
from lowbit.quantizer import quantize_weight
from lowbit.schemes import parse_scheme


@pytest.mark.parametrize("lo,hi,want", [
    (0.5, 1.0, (0.525, 0.975)),  # the review's example: it was shifted to [0.45, 0.9]
    (-1.0, -0.5, (-0.975, -0.525)),
    (-1.0, 0.5, (-0.925, 0.425)),
])
def test_float_zero_clip_shrinks_the_range_around_its_midpoint(lo, hi, want):
    fmt = get_format("uint4_fz")
    x = torch.linspace(lo, hi, 16).reshape(1, -1)
    qp = fmt.choose_qparams(x, clip=0.9)
    got = (float(qp.zero), float(qp.zero + fmt.qmax * qp.scale))
    assert got == pytest.approx(want, abs=1e-6)
    assert got[1] - got[0] == pytest.approx(0.9 * (hi - lo), abs=1e-6)  # shrunk by the ratio
    assert lo <= got[0] and got[1] <= hi  # inside the block's range


def test_float_zero_search_stays_inside_one_sided_blocks():
    """Every candidate of the search lies inside the block's range, so a positive block's zero is
    never below its minimum (scaling both ends put it at ``c·min``)."""
    g = torch.Generator().manual_seed(0)
    x = 0.5 + torch.rand(64, 32, generator=g) ** 3  # one-sided, with a long upper tail
    spec = parse_scheme("uint4_fz:g32:mse:scale=float32")
    qt = quantize_weight(x, spec)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    assert (qt.zero >= lo).all() and (qt.zero + 15 * qt.scale <= hi * (1 + 1e-6)).all()
    assert (qt.zero > lo).any()  # some blocks were clipped
