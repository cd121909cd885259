"""Fast paths against slow, obvious references written from the definitions.

* ``scan_reference``: for each x, scan every finite table value, keep the nearest; among equally
  near codes prefer even codes, then the smallest code (so ±0 -> code 0). This is the rule
  every nearest-value format promises (ties to even code = ties to even mantissa).
* ``minifloat_reference``: an independent arithmetic definition of ExMy rounding
  (exponent = floor(log2|x|), step = 2^(exp - man), round to nearest, ties to the even
  encoding, saturate) and of the bit layout ``sign | E | M``. For ``man >= 1`` the even
  encoding is the even mantissa (IEEE RNE); for ``man = 0`` it is the even exponent.

Inputs include random values over many binades, every exact midpoint of the grid and
out-of-range values. Codes must agree bit-exactly, on both rounding paths of table formats
(``quantize_both_paths``: a binary search for small inputs, a bucket look-up for large ones).
"""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from lowbit.formats import QParams, all_formats, get_format
from lowbit.formats.base import nearest_code
from lowbit.formats.binary import BinaryFormat
from lowbit.formats.float import FloatFormat
from lowbit.formats.grid import CodebookFormat, PowerFormat
from lowbit.formats.int import IntFormat
from lowbit.formats.micro import MXFormat, NVFP4Format
from lowbit.formats.nearest import BUCKET_MIN_NUMEL, NearestTable

UNIT = QParams(torch.ones(1, 1))


def scan_reference(xs: list[float], values: list[float]) -> list[int]:
    table = [(code, v) for code, v in enumerate(values) if not math.isnan(v)]
    out = []
    for x in xs:
        dist = [(abs(x - v), code, v) for code, v in table]
        near = min(d for d, _, _ in dist)
        # float64 distances can tie spuriously (|1e30 - v|); settle the close ones exactly
        close = [(abs(Fraction(x) - Fraction(v)), code) for d, code, v in dist if d <= near * (1 + 1e-9)]
        best_d = min(d for d, _ in close)
        best = [code for d, code in close if d == best_d]
        even = [c for c in best if c % 2 == 0]
        out.append(min(even or best))
    return out


def minifloat_reference(x: float, exp: int, man: int, bias: int, vmax: float) -> int:
    def encode(value: float, sign: int) -> int:
        if value == 0:
            return 0
        if value < 2.0 ** (1 - bias):  # subnormal
            E, M = 0, int(value / 2.0 ** (1 - bias - man))
        else:
            e = math.floor(math.log2(value))
            E, M = e + bias, int((value / 2.0**e - 1) * 2**man)
        return sign << (exp + man) | E << man | M

    sign, a = (1 if x < 0 else 0), abs(x)
    if a >= vmax:
        return encode(vmax, sign)
    e = max(math.floor(math.log2(a)), 1 - bias) if a > 0 else 1 - bias
    step = 2.0 ** (e - man)
    lo = math.floor(a / step) * step
    hi = lo + step
    if a - lo != hi - a:
        return encode(lo if a - lo < hi - a else hi, sign)
    # exact tie: the even encoding (= even mantissa; for man = 0 the exponent's last bit)
    return encode(lo, sign) if encode(lo, sign) % 2 == 0 else encode(hi, sign)


def inputs_for(fmt, n: int = 600, seed: int = 0) -> torch.Tensor:
    """(1, N) float32: random values over the grid's binades, every midpoint, out of range."""
    g = torch.Generator().manual_seed(seed)
    v = fmt.values()
    v = torch.unique(v[torch.isfinite(v)])
    mids = ((v[1:] + v[:-1]) / 2).float()
    lo = max(float(v.abs()[v != 0].min()), 1e-30)
    mag = torch.exp(torch.empty(n).uniform_(math.log(lo) - 1, math.log(fmt.max) + 1, generator=g))
    rnd = mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    extra = torch.tensor([0.0, -0.0, fmt.max * 1.5, -fmt.max * 1.5, 1e30, -1e30, fmt.max, -fmt.max])
    return torch.cat([rnd.float(), mids, -mids, extra]).reshape(1, -1)


def quantize_both_paths(fmt, x: torch.Tensor, qp: QParams = UNIT) -> list[int]:
    """Codes of ``x`` (1, N) in pieces below ``BUCKET_MIN_NUMEL`` and, tiled past it, whole.

    Table formats round small inputs by binary search and large ones by bucket look-up; both
    must give the same codes, which are returned as a list.
    """
    small = torch.cat([fmt.quantize(p, qp) for p in x.split(BUCKET_MIN_NUMEL - 1, dim=1)], dim=1)
    reps = BUCKET_MIN_NUMEL // x.numel() + 1
    assert torch.equal(fmt.quantize(x.repeat(1, reps), qp), small.repeat(1, reps))
    return small.flatten().tolist()


def nearest_value_formats() -> list[str]:
    """Registered formats whose quantize is "nearest table value of x / scale"."""
    skip = (PowerFormat, BinaryFormat)
    out = []
    for name, fmt in all_formats().items():
        if isinstance(fmt, skip) or fmt.zero_kind is not None:
            continue
        if isinstance(fmt, CodebookFormat) and fmt.symmetric:
            continue  # mirrored ties, tested below
        out.append(name)
    return out


@pytest.mark.parametrize("name", nearest_value_formats())
def test_fast_path_equals_table_scan(name):
    fmt = get_format(name)
    x = inputs_for(fmt)
    want = scan_reference(x.double().flatten().tolist(), fmt.values().tolist())
    assert quantize_both_paths(fmt, x) == want


@pytest.mark.parametrize("name", [n for n, f in all_formats().items() if isinstance(f, FloatFormat)]
                         + ["fp8_e4m3fn_b5", "fp6_e3m2_b1", "fp4_e2m1_ieee"])
def test_minifloat_equals_arithmetic_definition(name):
    extra = {"fp8_e4m3fn_b5": FloatFormat(4, 3, 5, "fn"), "fp6_e3m2_b1": FloatFormat(3, 2, 1),
             "fp4_e2m1_ieee": FloatFormat(2, 1, special="ieee")}
    fmt = extra.get(name) or get_format(name)
    x = inputs_for(fmt, seed=1)
    want = [minifloat_reference(v, fmt.exp, fmt.man, fmt.bias, fmt.max) for v in x.double().flatten().tolist()]
    assert quantize_both_paths(fmt, x) == want


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_int_equals_round_half_even(bits, narrow):
    fmt = IntFormat(bits, narrow_range=narrow)
    x = inputs_for(fmt, seed=bits)
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if narrow else -qmax - 1  # the full range reaches -2^(b-1)
    want = [max(qmin, min(qmax, round(v))) + 2 ** (bits - 1) for v in x.double().flatten().tolist()]
    assert fmt.quantize(x, UNIT).flatten().tolist() == want
    assert (min(want) == 0) != narrow  # the inputs reach past both ends


@pytest.mark.parametrize("bits,zero", [(b, z) for b in (2, 4, 8) for z in ("int", "float")])
def test_asymmetric_int_equals_definition(bits, zero):
    fmt = IntFormat(bits, False, zero)
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(500, generator=g) * 3, torch.arange(-4, 2**bits + 4) + 0.5]).reshape(1, -1)
    z = 3.0 if zero == "int" else -1.25
    qp = QParams(torch.full((1, 1), 0.75), torch.full((1, 1), z))
    s, qmax = 0.75, 2**bits - 1
    xs = x.double().flatten().tolist()
    if zero == "int":
        want = [max(0, min(qmax, round(v / s) + z)) for v in xs]
    else:
        want = [max(0, min(qmax, round((v - z) / s))) for v in xs]
    got = fmt.quantize(x, qp).flatten().tolist()
    assert got == want


@pytest.mark.parametrize("bits,a", [(3, 0.5), (4, 0.5), (4, 0.62), (8, 0.3), (5, 1.0)])
def test_power_equals_power_domain_definition(bits, a):
    fmt = PowerFormat(bits, a)
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.randn(800, generator=g), torch.tensor([0.0, 1.0, -1.0, 3.0, -3.0])]).reshape(1, -1)
    want = []
    for v in x.double().flatten().tolist():
        q = min(round(abs(v) ** a * qmax), qmax)  # scale 1: S = 1
        want.append((-q if v < 0 else q) + 2 ** (bits - 1))
    assert fmt.quantize(x, UNIT).flatten().tolist() == want


def test_symmetric_codebook_equals_mirrored_scan():
    table = (-2.0, -1.0, -0.25, 0.25, 1.0, 2.0)
    fmt = CodebookFormat(table, "six")
    x = inputs_for(fmt)
    xs = x.double().flatten().tolist()
    half = [math.nan] * 3 + list(table[3:]) + [math.nan] * 2  # codes 3..5 are the non-negative half
    mags = scan_reference([abs(v) for v in xs], half)
    want = [5 - c if v < 0 else c for v, c in zip(xs, mags)]
    assert quantize_both_paths(fmt, x) == want


def test_binary_is_the_sign():
    fmt = BinaryFormat()
    x = torch.tensor([[-2.0, -1e-30, -0.0, 0.0, 1e-30, 3.0]])
    assert fmt.quantize(x, QParams(torch.zeros(1, 1))).tolist() == [[0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("element", ["e2m1", "e3m2", "e2m3", "e4m3", "e5m2", "int8"])
def test_mx_equals_reference(element):
    """Shared exponent from ``math.frexp``; elements by table scan of x / X."""
    fmt = MXFormat(element)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 32, generator=g) * torch.exp2(torch.randint(-30, 30, (16, 1), generator=g).float())
    qp = fmt.choose_qparams(x)
    values = fmt.values().tolist()
    for row, scale, codes in zip(x.tolist(), qp.scale.flatten().tolist(), fmt.quantize(x, qp).tolist()):
        amax = max(abs(v) for v in row)
        e = math.frexp(amax)[1] - 1 - fmt.emax_elem
        assert scale == 2.0 ** max(-127, min(127, e))
        assert codes == scan_reference([v / scale for v in row], values)


def test_nvfp4_equals_reference():
    fmt = NVFP4Format()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 16, generator=g) * torch.exp2(torch.randint(-8, 8, (12, 1), generator=g).float())
    gs = fmt.global_scale(x)
    qp = fmt.choose_qparams(x, global_scale=gs)
    values = fmt.values().tolist()
    for row, s, codes in zip(x.tolist(), qp.scale.flatten().tolist(), fmt.quantize(x, qp).tolist()):
        want_s = torch.tensor(min(max(abs(v) for v in row) / 6 / gs.item(), 448.0)).to(torch.float8_e4m3fn)
        assert s == float(want_s)
        eff = float(torch.tensor(s, dtype=torch.float32) * gs)
        assert codes == scan_reference([float(torch.tensor(v) / eff) for v in row], values)


def test_crowded_bucket_falls_back_to_search():
    values = torch.tensor([-1.0, 0.0, 1.0, 1.001, 1.002, 1.003, math.nan, 2.0], dtype=torch.float64)
    table = NearestTable.build(values)
    assert table.buckets is None  # three bounds between 1.0 and 1.0078
    x = torch.linspace(-2, 3, BUCKET_MIN_NUMEL + 5)
    want = scan_reference(x.double().tolist(), values.tolist())
    assert table(x).tolist() == want
    assert nearest_code(x, values).tolist() == want


def test_nearest_code_float64_inputs_round_by_float64_midpoints():
    """Inputs that no float32 can hold: a float64 midpoint and its neighbours."""
    values = torch.tensor([0.0, 0.1, 0.3, 1.0 / 3.0], dtype=torch.float64)
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([mids, torch.nextafter(mids, torch.tensor(math.inf, dtype=torch.float64)),
                   torch.nextafter(mids, torch.tensor(-math.inf, dtype=torch.float64))])
    assert nearest_code(x, values).tolist() == scan_reference(x.tolist(), values.tolist())
