"""Conformance suite: every registered format, no opt-out (STYLE.md, "Tests that prove numerics").

Each format goes through the public path ``quantize_weight(w, QuantSpec(fmt, PerGroup(...)))``
and through its own methods. Block size: the format's ``fixed_block`` or 32; the weight has 80
columns so that every row ends in a partial block.
"""
from __future__ import annotations

import json

import pytest
import torch

from lowbit import grouping
from lowbit.formats import QParams, all_formats, format_from_dict, get_format
from lowbit.formats.grid import PowerFormat
from lowbit.formats.nearest import BUCKET_MIN_NUMEL
from lowbit.packing import pack, unpack
from lowbit.qtensor import QuantizedTensor
from lowbit.quantizer import choose_qparams, quantize_weight
from lowbit.spec import PerGroup, QuantSpec

FORMATS = all_formats()
NAMES = list(FORMATS)


def spec_for(fmt, **kw) -> QuantSpec:
    return QuantSpec(fmt, PerGroup(fmt.fixed_block or 32), **kw)


def random_weight(seed: int, rows: int = 6, cols: int = 80) -> torch.Tensor:
    """Gaussian rows with magnitudes spread over four decades, no exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows).reshape(-1, 1)
    return torch.where(w == 0, torch.full_like(w, 1e-3), w)


def blocks_of(qt: QuantizedTensor, w: torch.Tensor):
    """Yield (weight blocks, code blocks, stored qparams) for every region of ``qt``."""
    codes = qt.codes()
    for region in grouping.regions(qt.matrix_shape, qt.tile):
        yield grouping.to_blocks(w, region), grouping.to_blocks(codes, region), qt.qparams(region)


def unit_qparams(fmt, n: int = 1) -> QParams:
    """Scale 1 (and zero 0), so that ``dequantize(code) == values()[code]``."""
    zero = torch.zeros(n, 1) if fmt.zero_kind else None
    return QParams(torch.ones(n, 1), zero)


def grid_in_weight_units(fmt, qp: QParams) -> torch.Tensor:
    """(n_blocks, K) every distinct reconstruction value of each block, float64, ascending (a
    negative scale, ``signed_scale`` formats, reverses the table)."""
    v = fmt.values()
    v = torch.unique(v[torch.isfinite(v)])  # sorted
    s = qp.scale.double()
    if qp.global_scale is not None:
        s = (qp.scale * qp.global_scale).double()
    if fmt.zero_kind == "int":
        grid = (v - qp.zero.double()) * s
    elif fmt.zero_kind == "float":
        grid = v * s + qp.zero.double()
    else:
        grid = v * s
    return torch.sort(grid, dim=1).values


@pytest.fixture(params=NAMES)
def fmt(request):
    return FORMATS[request.param]


def test_registry_names_and_values_table(fmt):
    assert get_format(fmt.name) is fmt
    v = fmt.values()
    assert v.dtype == torch.float64 and v.shape == (2**fmt.bits,)
    assert torch.isfinite(v).sum() >= 2
    assert 0 < fmt.max < float("inf")


# --- (a) codes round-trip ----------------------------------------------------------------
def test_produced_codes_round_trip(fmt):
    w = random_weight(0)
    qt = quantize_weight(w, spec_for(fmt))
    for _, codes, qp in blocks_of(qt, w):
        assert torch.isfinite(fmt.values()[codes.long()]).all(), "quantize produced an unused code"
        again = fmt.quantize(fmt.dequantize(codes, qp), qp)
        assert torch.equal(again, codes)


def test_every_valid_code_round_trips_at_unit_scale(fmt):
    v = fmt.values()
    codes = torch.nonzero(torch.isfinite(v)).flatten().to(torch.uint8).reshape(1, -1)
    qp = unit_qparams(fmt)
    x = fmt.dequantize(codes, qp)
    assert torch.equal(x, v[codes.long()].float())
    again = fmt.quantize(x, qp)
    # ±0 share a value, so compare values rather than codes
    assert torch.equal(v[again.long()], v[codes.long()])


def test_fake_quantize_is_dequantize_of_quantize(fmt):
    """A family's fused ``fake_quantize`` gives ``dequantize(quantize(·))`` value for value, on
    the stored qparams and on shrunk ones (clipped weights), zero blocks included."""
    w = random_weight(3)
    w[0, :64] = 0.0
    for x, _, qp in blocks_of(quantize_weight(w, spec_for(fmt)), w):
        for q in (qp, QParams(qp.scale * 0.7, qp.zero, qp.global_scale)):
            assert torch.equal(fmt.fake_quantize(x, q), fmt.dequantize(fmt.quantize(x, q), q))


# --- (b) error within half a step inside the range ---------------------------------------
def test_error_within_half_step(fmt):
    w = random_weight(1)
    qt = quantize_weight(w, spec_for(fmt))
    for x, codes, qp in blocks_of(qt, w):
        if isinstance(fmt, PowerFormat):
            check_power_domain(fmt, x, codes, qp)
            continue
        grid = grid_in_weight_units(fmt, qp)  # (n, K)
        x64, xhat = x.double(), fmt.dequantize(codes, qp).double()
        inside = (x64 >= grid[:, :1]) & (x64 <= grid[:, -1:])
        below = torch.where(grid[:, None, :] <= x64[..., None], grid[:, None, :], -torch.inf).amax(-1)
        above = torch.where(grid[:, None, :] >= x64[..., None], grid[:, None, :], torch.inf).amin(-1)
        half_gap = torch.where(inside, (above - below) / 2, 0.0)
        eps = 1e-6 * (x64.abs() + xhat.abs()) + 1e-30
        err = (x64 - xhat).abs()
        assert (err[inside] <= half_gap[inside] + eps[inside]).all()
        assert inside.float().mean() > 0.5  # the check is not vacuous


def check_power_domain(fmt: PowerFormat, x, codes, qp) -> None:
    """Power formats round in the power domain: ``|q|`` is the nearest integer to ``y``."""
    y = fmt.power_domain(x, qp)
    q = codes.long() - 2 ** (fmt.bits - 1)
    inside = y <= fmt.qmax
    assert ((y - q.abs()).abs()[inside] <= 0.5 + 1e-9).all()
    assert (q.abs()[~inside] == fmt.qmax).all()
    assert (torch.sign(q) * torch.sign(x) >= 0).all()


# --- (c) odd formats are odd; other symmetric ones are odd but for their extra code -------
@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.odd])
def test_odd_formats_are_odd(name):
    fmt = FORMATS[name]
    w = random_weight(2)
    spec = spec_for(fmt)
    assert torch.equal(quantize_weight(-w, spec).dequantize(), -quantize_weight(w, spec).dequantize())
    for x, _, qp in blocks_of(quantize_weight(w, spec), w):
        # a signed-scale grid is odd through its scale: -x takes the scale -s and the same codes
        qn = QParams(-qp.scale, qp.zero, qp.global_scale) if fmt.signed_scale else qp
        assert fmt.signed_scale == bool((qp.scale < 0).any())
        pos = fmt.dequantize(fmt.quantize(x, qp), qp)
        neg = fmt.dequantize(fmt.quantize(-x, qn), qn)
        assert torch.equal(neg, -pos)
        if fmt.signed_scale:
            assert torch.equal(fmt.quantize(-x, qn), fmt.quantize(x, qp))


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f.symmetric and not f.odd])
def test_symmetric_formats_are_odd_except_at_their_extra_code(name):
    """A full-range integer grid has one value with no twin, its most negative one: ``Q(-x)``
    is ``-Q(x)`` wherever neither is that value, and the table without it is odd."""
    fmt = FORMATS[name]
    v = fmt.values()
    v = torch.sort(v[torch.isfinite(v)]).values
    extra, rest = v[0], v[1:]
    assert torch.equal(rest, -rest.flip(0)) and extra == -v[-1] - (v[-1] - v[-2])
    w = random_weight(2)
    for x, _, qp in blocks_of(quantize_weight(w, spec_for(fmt)), w):
        pos = fmt.dequantize(fmt.quantize(x, qp), qp)
        neg = fmt.dequantize(fmt.quantize(-x, qp), qp)
        lowest = float(extra) * qp.scale
        keep = (pos != lowest) & (neg != lowest)
        assert torch.equal(neg[keep], -pos[keep])
        assert (~keep).any()  # the extra code is used (the block's negative extreme)


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if not f.symmetric])
def test_asymmetric_flag_is_honest(name):
    """A format that says it is not symmetric has a zero point or a table that is not odd."""
    fmt = FORMATS[name]
    v = fmt.values()
    v = torch.sort(v[torch.isfinite(v)]).values
    assert fmt.zero_kind is not None or not torch.equal(v, -v.flip(0))


# --- (d) zero and constant blocks --------------------------------------------------------
def test_all_zero_blocks_are_exact(fmt):
    w = torch.zeros(3, 80)
    w[1, :40] = torch.linspace(-1, 1, 40)  # one row with data, other blocks all zero
    qt = quantize_weight(w, spec_for(fmt))
    assert torch.isfinite(qt.scale).all()
    deq = qt.dequantize()
    assert torch.isfinite(deq).all()
    zero_mask = torch.ones_like(w, dtype=torch.bool)
    zero_mask[1, :64] = False  # blocks of 32 (or 16) overlapping the data
    assert torch.equal(deq[zero_mask], torch.zeros(int(zero_mask.sum())))
    assert torch.equal(quantize_weight(torch.zeros(2, 40), spec_for(fmt)).dequantize(), torch.zeros(2, 40))


@pytest.mark.parametrize("c", [0.37, -2.5, 1e-3, 3e4])
def test_constant_blocks_are_finite(fmt, c):
    w = torch.full((2, 64), c)
    qt = quantize_weight(w, spec_for(fmt))
    deq = qt.dequantize()
    assert torch.isfinite(qt.scale).all() and (fmt.signed_scale or (qt.scale >= 0).all())
    assert torch.isfinite(deq).all()
    assert (deq - w).abs().max() <= abs(c) * (1 + 1e-3)


# --- (e) specs and formats round-trip through JSON ---------------------------------------
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_spec_json_round_trip(fmt, search):
    spec = spec_for(fmt, scale_search=search)
    back = QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec
    assert format_from_dict(fmt.to_dict()) == fmt
    assert format_from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt


# --- (f) QuantizedTensor serialization ---------------------------------------------------
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_quantized_tensor_tensors_round_trip(fmt, search):
    w = random_weight(3)
    qt = quantize_weight(w, spec_for(fmt, scale_search=search))
    meta = json.loads(json.dumps(qt.meta()))
    back = QuantizedTensor.from_tensors(meta, {k: v.clone() for k, v in qt.to_tensors().items()})
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert torch.equal(back.scale, qt.scale)


def test_mse_search_never_worse_than_minmax(fmt):
    w = random_weight(4)
    err = {s: (quantize_weight(w, spec_for(fmt, scale_search=s)).dequantize() - w).pow(2).sum()
           for s in ("minmax", "mse")}
    assert err["mse"] <= err["minmax"] * (1 + 1e-6)


def test_pack_round_trip_all_codes(fmt):
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8).repeat(3)
    assert torch.equal(unpack(pack(codes, fmt.bits), fmt.bits, codes.numel()), codes)


# --- (g) quantization is elementwise given the qparams (what GPTQ relies on) -------------
@pytest.mark.parametrize("search", ["minmax", "mse"])
def test_quantization_is_elementwise_given_qparams(fmt, search):
    """GPTQ quantizes one column at a time: column j of a block stack (n, k), quantized alone as
    an (n, 1) stack with the same (n, 1) qparams (and global scale), gets exactly the codes it
    gets in the whole stack, and dequantizes to the same values.

    The whole stack is large enough for the bucket look-up of table formats, a column is not
    (it takes the search path), so the two rounding paths are compared here as well.
    """
    n, k = 160, fmt.fixed_block or 32
    blocks = random_weight(5, rows=n, cols=k)  # (n, k) one block per row
    assert n < BUCKET_MIN_NUMEL <= blocks.numel()
    qp = choose_qparams(blocks, spec_for(fmt, scale_search=search), fmt.global_scale(blocks))
    codes, deq = fmt.quantize(blocks, qp), fmt.dequantize(fmt.quantize(blocks, qp), qp)
    cols = [fmt.quantize(blocks[:, j : j + 1], qp) for j in range(k)]  # each (n, 1)
    assert all(c.shape == (n, 1) and c.dtype == torch.uint8 for c in cols)
    assert torch.equal(torch.cat(cols, dim=1), codes)
    assert torch.equal(torch.cat([fmt.dequantize(c, qp) for c in cols], dim=1), deq)
    assert torch.equal(fmt.quantize(blocks[:, 3:4].contiguous(), qp), codes[:, 3:4])
    assert codes.unique().numel() > 1  # not vacuous
