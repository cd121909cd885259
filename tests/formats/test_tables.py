"""Published value tables: OCP FP8/FP6/FP4, torch's float8 dtypes, NF4, MX and NVFP4 scale rules."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import QParams, get_format
from lowbit.formats.float import FloatFormat, minifloat_values
from lowbit.formats.grid import NF4_VALUES, CodebookFormat, PowerFormat
from lowbit.formats.int import IntFormat
from lowbit.formats.micro import MXFormat, NVFP4Format
from lowbit.quantizer import quantize_weight
from lowbit.spec import PerGroup, QuantSpec



def torch_table(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float64)


def nan_codes(v: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isnan(v)).flatten().tolist()


# --- OCP FP8 -------------------------------------------------------------------------------
def test_e4m3fn_matches_ocp_and_torch():
    f = get_format("fp8_e4m3fn")
    v = f.values()
    torch.testing.assert_close(v, torch_table(torch.float8_e4m3fn), rtol=0, atol=0, equal_nan=True)
    assert f.max == 448.0 and v[0x7E] == 448.0
    assert v[0x08] == 2.0**-6  # min normal
    assert v[0x01] == 2.0**-9  # min subnormal
    assert nan_codes(v) == [0x7F, 0xFF]


def test_e5m2_matches_ocp_and_torch():
    f = get_format("fp8_e5m2")
    full = minifloat_values(5, 2, 15, "ieee")
    torch.testing.assert_close(full, torch_table(torch.float8_e5m2), rtol=0, atol=0, equal_nan=True)
    assert full[0x7C] == math.inf and full[0xFC] == -math.inf
    assert nan_codes(full) == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]
    v = f.values()  # inf is not a value a weight can take: NaN in the table
    assert nan_codes(v) == [0x7C, 0x7D, 0x7E, 0x7F, 0xFC, 0xFD, 0xFE, 0xFF]
    assert f.max == 57344.0 and v[0x7B] == 57344.0
    assert v[0x01] == 2.0**-16 and v[0x04] == 2.0**-14


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_rounding_matches_torch_float8(name, dtype):
    f = get_format(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * torch.exp2(torch.randint(-20, 18, (64, 1), generator=g).float())
    x = x[x.abs() <= f.max].reshape(1, -1)
    ours = f.dequantize(f.quantize(x, QParams(torch.ones(1, 1))), QParams(torch.ones(1, 1)))
    assert torch.equal(ours, x.to(dtype).to(torch.float32))


def test_rounding_saturates_instead_of_overflowing():
    for name in ("fp8_e4m3fn", "fp8_e5m2", "fp4_e2m1"):
        f = get_format(name)
        x = torch.tensor([[f.max * 1.01, f.max * 1.5, 1e30, -1e30, -f.max * 1.2]])
        got = f.dequantize(f.quantize(x, QParams(torch.ones(1, 1))), QParams(torch.ones(1, 1)))
        assert torch.equal(got, torch.tensor([[f.max, f.max, f.max, -f.max, -f.max]]))


# --- OCP FP6 / FP4 and other minifloats ----------------------------------------------------
def positive_set(fmt) -> list[float]:
    v = fmt.values()
    return sorted({float(a) for a in v[torch.isfinite(v)] if a >= 0})


def test_fp6_and_fp4_tables():
    assert get_format("fp6_e3m2").max == 28.0
    assert get_format("fp6_e2m3").max == 7.5
    assert positive_set(get_format("fp6_e3m2"))[1] == 0.0625  # min subnormal 2^-4
    assert positive_set(get_format("fp6_e2m3"))[1] == 0.125  # min subnormal 2^-3
    assert positive_set(get_format("fp4_e2m1")) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    v = get_format("fp4_e2m1").values()
    assert v.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


@pytest.mark.parametrize("man", range(0, 6))
def test_e1my_is_the_uniform_int_grid(man):
    """E1My is uniform (one exponent bit: the subnormal and normal binades have the same step),
    the odd INT(y+2) grid times 2^(1-y)."""
    got = positive_set(FloatFormat(1, man))
    iv = IntFormat(man + 2).values()
    want = sorted({float(a) * 2.0 ** (1 - man) for a in iv[torch.isfinite(iv)] if a >= 0})
    assert got == want


def test_float_parameters_are_validated():
    for kwargs in ({"exp": 0, "man": 3}, {"exp": 4, "man": 4}, {"exp": 2, "man": -1},
                   {"exp": 4, "man": 3, "special": "inf"}, {"exp": 1, "man": 2, "special": "ieee"},
                   {"exp": 5, "man": 2, "bias": 300}):
        with pytest.raises(LowbitError):
            FloatFormat(**kwargs)
    assert FloatFormat(4, 3) == FloatFormat(4, 3, 7)  # default bias is filled in
    assert FloatFormat(2, 1, bias=2).max == 3.0 and FloatFormat(2, 1, bias=2).name == "fp4_e2m1_b2"


def test_float_names():
    assert FloatFormat(4, 3, special="fn").name == "fp8_e4m3fn"
    assert FloatFormat(5, 2, special="ieee").name == "fp8_e5m2"
    assert FloatFormat(5, 2).name == "fp8_e5m2_nospecial" and FloatFormat(5, 2).max == 114688.0
    assert FloatFormat(4, 3).name == "fp8_e4m3" and FloatFormat(4, 3).max == 480.0
    assert FloatFormat(3, 2, special="ieee").name == "fp6_e3m2_ieee"


# --- NF4, codebooks, power ------------------------------------------------------------------
def test_nf4_table():
    f = get_format("nf4")
    assert f.bits == 4 and not f.symmetric
    assert f.values().tolist() == list(NF4_VALUES)
    assert NF4_VALUES[7] == 0.0 and NF4_VALUES[0] == -1.0 and NF4_VALUES[-1] == 1.0
    assert NF4_VALUES[8] == 0.07958029955625534 and NF4_VALUES[1] == -0.6961928009986877


def test_codebook_sorting_padding_and_validation():
    f = CodebookFormat((0.5, -1.0, 2.0), "three")
    assert f.table == (-1.0, 0.5, 2.0) and f.bits == 2 and not f.symmetric
    assert torch.isnan(f.values()[3]) and f.max == 2.0
    assert CodebookFormat((-1.5, -0.5, 0.5, 1.5)).symmetric
    for bad in ((1.0,), (1.0, 1.0), (0.0, math.inf), tuple(range(257)), (0.0, -0.0)):
        with pytest.raises(LowbitError):
            CodebookFormat(bad)


def test_symmetric_even_codebook_stays_odd_at_ties():
    f = CodebookFormat((-1.5, -0.5, 0.5, 1.5))
    qp = QParams(torch.ones(1, 1))
    x = torch.tensor([[0.0, 1.0, -1.0, 2.0, -2.0]])
    got = f.dequantize(f.quantize(x, qp), qp)
    neg = f.dequantize(f.quantize(-x, qp), qp)
    assert got.tolist() == [[0.5, 0.5, -0.5, 1.5, -1.5]]  # 1.0 is a tie: the even code (0.5)
    assert torch.equal(neg[:, 1:], -got[:, 1:])


def test_power_values_and_a1_equals_int():
    f = PowerFormat(3, 0.5)
    want = torch.tensor([-1.0, -(2 / 3) ** 2, -(1 / 3) ** 2, 0.0, (1 / 3) ** 2, (2 / 3) ** 2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(f.values()[1:], want, rtol=1e-15, atol=0)
    assert math.isnan(f.values()[0])
    p, i = PowerFormat(4, 1.0), IntFormat(4, narrow_range=True)  # power grids are odd: the narrow int grid
    torch.testing.assert_close(p.values()[1:] * 7, i.values()[1:], rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    cp = p.quantize(w, p.choose_qparams(w))
    ci = i.quantize(w, i.choose_qparams(w))
    assert (cp != ci).float().mean() < 1e-3  # equal up to float32 rounding exactly at midpoints
    for bad in ({"bits": 1}, {"bits": 9}, {"a": 0.0}, {"a": 1.5}):
        with pytest.raises(LowbitError):
            PowerFormat(**{"bits": 4, "a": 0.5, **bad})


# --- MX ------------------------------------------------------------------------------------
EMAX = {"e2m1": 2, "e3m2": 4, "e2m3": 2, "e4m3": 8, "e5m2": 15, "int8": 0}
ELEMENT_MAX = {"e2m1": 6.0, "e3m2": 28.0, "e2m3": 7.5, "e4m3": 448.0, "e5m2": 57344.0, "int8": 127 / 64}


@pytest.mark.parametrize("element", list(EMAX))
def test_mx_element_emax_and_max(element):
    f = MXFormat(element)
    assert f.emax_elem == EMAX[element] and f.max == ELEMENT_MAX[element]
    assert f.fixed_block == 32 and f.scale_storage == "e8m0"


@pytest.mark.parametrize("element,amax,scale", [
    ("e2m1", 6.0, 1.0), ("e2m1", 7.9, 1.0), ("e2m1", 8.0, 2.0), ("e2m1", 0.75, 2.0**-3),
    ("e4m3", 1.0, 2.0**-8), ("e4m3", 448.0, 1.0), ("e5m2", 1.0, 2.0**-15),
    ("e3m2", 20.0, 1.0), ("e2m3", 3.0, 0.5), ("int8", 1.5, 1.0), ("int8", 3.0, 2.0),
    ("e4m3", 2.0**-140, 2.0**-127), ("e2m1", 0.0, 2.0**-127), ("int8", 2.0**127, 2.0**127),
])
def test_mx_e8m0_scale_rule(element, amax, scale):
    f = MXFormat(element)
    blocks = torch.zeros(1, 32)
    blocks[0, 5] = -amax
    qp = f.choose_qparams(blocks)
    assert qp.scale.dtype == torch.float32 and qp.scale.shape == (1, 1)
    assert qp.scale.item() == scale


def test_mxfp4_worked_block():
    f = get_format("mxfp4")
    x = torch.zeros(1, 32)
    x[0, :6] = torch.tensor([5.0, 3.2, -0.26, 0.25, 0.75, -7.9])  # amax 7.9: X = 2^(2-2) = 1
    qp = f.choose_qparams(x)
    got = f.dequantize(f.quantize(x, qp), qp)
    assert qp.scale.item() == 1.0
    assert got[0, :6].tolist() == [4.0, 3.0, -0.5, 0.0, 1.0, -6.0]  # 5 -> 4 (tie, even), -7.9 saturates


def test_mxint8_codes_are_twos_complement_and_symmetric():
    f = get_format("mxint8")
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([1.0, -1.0, -1.999, 0.5])  # amax 1.999: X = 1
    codes = f.quantize(x, f.choose_qparams(x))
    assert codes[0, :4].tolist() == [64, 192, 129, 32]  # -1.999 saturates to -127, never -128
    assert math.isnan(f.values()[128])


def test_mx_scale_is_stored_as_e8m0():
    w = torch.randn(4, 64) * torch.tensor([[1e-3], [1.0], [1e3], [0.0]])
    qt = quantize_weight(w, QuantSpec(get_format("mxfp8_e4m3"), PerGroup(32)))
    stored = qt.to_tensors()["scale"]
    assert stored.dtype == torch.uint8
    assert torch.equal(torch.exp2(stored.float() - 127), qt.scale)
    assert (stored[3] == 0).all()  # all-zero blocks: 2^-127


# --- NVFP4 ---------------------------------------------------------------------------------
def test_nvfp4_scales():
    f = NVFP4Format()
    assert f.fixed_block == 16 and f.scale_storage == "float8_e4m3fn" and f.bits == 4
    x = torch.zeros(4, 16)
    x[0, 0], x[1, 0], x[2, 0] = 2688.0, 12.0, 13.0
    g = f.global_scale(x)
    assert g.dtype == torch.float32 and g.shape == () and g.item() == 1.0
    qp = f.choose_qparams(x, global_scale=g)
    assert qp.scale.flatten().tolist() == [448.0, 2.0, 2.25, 0.0]  # 13/6 = 2.17 -> e4m3 2.25
    assert torch.equal(qp.scale.to(torch.float8_e4m3fn).float(), qp.scale)
    assert f.global_scale(torch.zeros(3, 16)).item() == 1.0
    tiny = torch.zeros(1, 16)
    tiny[0, 0] = 1e-6
    assert f.choose_qparams(tiny, global_scale=torch.tensor(1.0)).scale.item() == 2.0**-9


def test_nvfp4_dequantize_uses_both_scales():
    f = get_format("nvfp4")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g) * 1e-2
    qt = quantize_weight(w, QuantSpec(f, PerGroup(16)))
    gs = qt.global_scale
    assert gs is not None and torch.isclose(gs, w.abs().max() / 2688)
    codes = qt.codes().reshape(8, 4, 16)
    want = f.values().float()[codes.long()] * (qt.scale.reshape(8, 4, 1) * gs)
    assert torch.equal(qt.dequantize(), want.reshape(8, 64))
    assert qt.scale.max() == 448.0
