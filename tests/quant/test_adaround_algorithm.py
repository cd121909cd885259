"""AdaRound's pure parts against the paper's definitions (arXiv:2004.10568), over every grid kind."""
from __future__ import annotations

import pytest
import torch

from lowbit.algorithms.adaround import GAMMA, ZETA, beta_at, grid_pair, initial_v, rectified_sigmoid, regularizer, soft
from lowbit.qat.fakequant import initial_qparams
from lowbit.quantizer import quantize_matrix
from lowbit.schemes import parse_tensor_scheme

INTEGER = ["int4:g32", "uint4:g32", "int3:channel", "int2:g16", "uint4_fz:g32", "uint4_fz:g32:hqq", "int8:channel"]
OTHER = ["nf4:g32", "fp4_e2m1:g32", "pow4_a0.5:g32", "mxfp4", "nvfp4"]


def pair_of(scheme: str, m: torch.Tensor):
    spec = parse_tensor_scheme(scheme).weight
    scale, zero, gscale = initial_qparams(m, spec)
    return spec, gscale, grid_pair(m, spec, scale, zero, gscale)


def test_rectified_sigmoid_range_and_definition():
    V = torch.linspace(-30, 30, 2001)
    h = rectified_sigmoid(V)
    assert h.min() == 0 and h.max() == 1 and bool((h[1:] >= h[:-1]).all())
    slow = torch.tensor([min(1.0, max(0.0, float(torch.sigmoid(v)) * (ZETA - GAMMA) + GAMMA)) for v in V])
    assert torch.allclose(h, slow, atol=1e-7)
    assert float(rectified_sigmoid(torch.tensor(0.0))) == pytest.approx(0.5)


def test_regularizer_is_zero_at_the_ends_and_one_at_a_half():
    for beta in (2.0, 7.5, 20.0):
        assert float(regularizer(torch.tensor([0.0, 1.0, 1.0, 0.0]), beta)) == 0.0
        assert float(regularizer(torch.tensor([0.5]), beta)) == 1.0
        h = torch.tensor([0.3])
        assert float(regularizer(h, beta)) == pytest.approx(1 - 0.4**beta)


def test_beta_schedule_warms_up_then_falls_from_20_to_2():
    assert [beta_at(s, 100) for s in range(20)] == [None] * 20
    assert beta_at(20, 100) == 20.0 and beta_at(99, 100) == pytest.approx(2 + 18 / 80)
    assert beta_at(60, 100) == pytest.approx(11.0)


@pytest.mark.parametrize("scheme", INTEGER + OTHER)
def test_neighbours_bracket_the_weight_and_the_soft_start_reproduces_it(scheme):
    m = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    spec, gscale, p = pair_of(scheme, m)
    inside = p.hi > p.lo
    assert inside.float().mean() > 0.8  # int2: weights above s·1 clip
    assert bool((p.lo[inside] <= m[inside]).all() and (m[inside] <= p.hi[inside]).all())
    # the reconstructions of the codes are the neighbours
    codes_lo = torch.where(inside, p.down, p.near)
    assert torch.equal(p.hard(torch.full_like(m, -1.0)), p.lo) and torch.equal(p.hard(torch.zeros_like(m)), p.hi)
    V = p.start()
    tol = 6e-4 if spec.format.family == "power" else 1e-6  # the tie rule moves power-grid starts (docstring)
    err = ((soft(p.lo, p.hi, V) - m).abs() / (p.hi - p.lo).clamp(min=1e-30))[inside]
    assert float(err.max()) <= tol
    # outside the grid both neighbours are the grid's end: the format's own code
    assert torch.equal(p.codes(V)[~inside], p.near[~inside]) and codes_lo.dtype == torch.uint8


@pytest.mark.parametrize("scheme", INTEGER)
def test_the_hard_start_is_round_to_nearest_on_integer_grids_ties_included(scheme):
    g = torch.Generator().manual_seed(1)
    m = torch.randn(32, 64, generator=g)
    spec = parse_tensor_scheme(scheme).weight
    scale, zero, gscale = initial_qparams(m, spec)
    # put a third of the weights exactly on half steps (ties) of the first row's grid
    if spec.format.zero_kind is None:
        s = scale[0, 0]
        m[0, ::3] = s * (torch.randint(-3, 3, (m[0, ::3].numel(),), generator=g).float() + 0.5)
        scale, zero, gscale = initial_qparams(m, spec)
    p = grid_pair(m, spec, scale, zero, gscale)
    codes, _, _ = quantize_matrix(m, spec, gscale)
    assert torch.equal(p.codes(p.start()), codes)
    assert torch.equal(p.near, codes)


def test_initial_v_inverts_h_and_takes_the_given_side_at_a_tie():
    frac = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 1.0])
    up = torch.tensor([False, False, False, True, False, True, True])
    V = initial_v(frac, up)
    others = torch.arange(7) != 4
    assert torch.allclose(rectified_sigmoid(V)[others], frac[others], atol=2e-7)
    assert bool(V[3] >= 0) and bool(V[4] < 0)  # a tie goes where the format's rounding went
    assert float(rectified_sigmoid(V[4])) == pytest.approx(0.5, abs=3e-4)
