"""Integer grids: full-range, narrow-range and signed-scale symmetric tables, their scale rules
against a slow reference, and the meaning of format dicts written before the full range existed."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import format_from_dict, get_format
from lowbit.formats.int import IntFormat
from lowbit.qtensor import QuantizedTensor
from lowbit.quantizer import quantize_weight
from lowbit.schemes import parse_scheme
from lowbit.spec import PerGroup, QuantSpec

#: format version 1 (lowbit before the full range): ``{"name": "int4"}`` meant this dict
V1_INT4 = {"family": "int", "bits": 4, "symmetric": True, "zero": "int"}


def finite(fmt) -> list[float]:
    v = fmt.values()
    return v[torch.isfinite(v)].tolist()


# --- value tables from the definition ----------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_full_range_tables_use_every_code(bits):
    n = 2 ** (bits - 1)
    fmt = get_format(f"int{bits}")
    assert fmt == IntFormat(bits) and not fmt.narrow_range and fmt.symmetric and not fmt.odd
    assert finite(fmt) == list(range(-n, n))  # code c holds c - 2^(b-1): all 2^b codes
    assert (fmt.qmin, fmt.qmax, fmt.max) == (-n, n - 1, n)


@pytest.mark.parametrize("bits", range(2, 9))
def test_narrow_range_tables_drop_the_lowest_code(bits):
    n = 2 ** (bits - 1)
    fmt = get_format(f"int{bits}_narrow")
    assert fmt == IntFormat(bits, narrow_range=True) and fmt.odd
    assert math.isnan(fmt.values()[0]) and finite(fmt) == list(range(-n + 1, n))
    assert (fmt.qmin, fmt.qmax, fmt.max) == (-n + 1, n - 1, n - 1)


def test_small_tables_spelled_out():
    assert finite(get_format("int2")) == [-2, -1, 0, 1]
    assert finite(get_format("int2_narrow")) == [-1, 0, 1]  # ternary: what w2g64 was before
    assert finite(get_format("int3")) == [-4, -3, -2, -1, 0, 1, 2, 3]
    assert finite(get_format("int3_narrow")) == [-3, -2, -1, 0, 1, 2, 3]


def test_narrow_range_is_for_symmetric_formats_only():
    with pytest.raises(LowbitError, match="narrow_range applies to symmetric"):
        IntFormat(4, symmetric=False, narrow_range=True)


# --- the scale rule against a slow reference ---------------------------------------------------
def reference_rtn(w: torch.Tensor, bits: int, group: int, narrow: bool) -> torch.Tensor:
    """Element by element from the definition: ``s = fp16(absmax / 2^(b-1))`` (narrow:
    ``absmax / (2^(b-1) - 1)``), ``q = clamp(round_half_even(x / s), qmin, 2^(b-1) - 1)``."""
    n = 2 ** (bits - 1)
    qmin, qmax = (-(n - 1), n - 1) if narrow else (-n, n - 1)
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0:g0 + group].tolist()
            amax = max(abs(v) for v in x)
            s = float(torch.tensor(amax / (qmax if narrow else n)).half())
            for j, v in enumerate(x):
                q = min(max(round(v / s), qmin), qmax) if s > 0 else 0  # Python rounds half to even
                out[r, g0 + j] = q * s
    return out


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_matches_the_reference(bits, narrow):
    w = torch.randn(5, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[1, :32] = 0.0  # an all-zero group
    fmt = IntFormat(bits, narrow_range=narrow)
    got = quantize_weight(w, QuantSpec(fmt, PerGroup(32))).dequantize()
    torch.testing.assert_close(got, reference_rtn(w, bits, 32, narrow), rtol=0, atol=1e-7)


def test_the_negative_extreme_takes_the_extra_code():
    """The block's absmax, when negative, is exactly representable as ``-2^(b-1)·s``; when
    positive, it clips to ``(2^(b-1) - 1)·s``."""
    fmt = get_format("int2")
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.9], [1.0, 0.5, 0.0, -0.5, -0.9]])
    qp = fmt.choose_qparams(x)
    assert qp.scale.flatten().tolist() == [0.5, 0.5]
    deq = fmt.dequantize(fmt.quantize(x, qp), qp)
    assert deq.tolist() == [[-1.0, -0.5, 0.0, 0.5, 0.5], [0.5, 0.5, 0.0, -0.5, -1.0]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rtn_uses_all_codes_on_gaussian_weights(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    full = quantize_weight(w, parse_scheme(f"int{bits}:g64")).codes()
    narrow = quantize_weight(w, parse_scheme(f"int{bits}_narrow:g64")).codes()
    assert full.unique().numel() == 2**bits and narrow.unique().numel() == 2**bits - 1


def test_full_range_halves_int2_error_on_a_gaussian_matrix():
    """The review's example: w2g64 on a 64×256 Gaussian matrix had relative error 0.72 on the
    ternary grid, against 0.43 for the ``ternary`` format at the same bits."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    rel = {n: float((quantize_weight(w, parse_scheme(f"{n}:g64")).dequantize() - w).norm() / w.norm())
           for n in ("int2", "int2_narrow", "ternary")}
    assert rel["int2_narrow"] > 0.7 and rel["int2"] < min(0.45, rel["ternary"] + 0.02)


# --- the signed scale (GGUF Q4_0's rule) ---------------------------------------------------------
def reference_signed(w: torch.Tensor, bits: int, group: int, clip: float = 1.0) -> torch.Tensor:
    """Element by element: ``m`` the group's first weight of largest magnitude, with its sign,
    ``s = fp16(clip·m / -2^(b-1))``, ``q = clamp(round_half_even(x / s), -2^(b-1), 2^(b-1) - 1)``.
    A final partial group is its own block."""
    n = 2 ** (bits - 1)
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], group):
            x = w[r, g0:g0 + group].tolist()
            m = x[0]
            for v in x:
                if abs(v) > abs(m):
                    m = v
            s = float(torch.tensor(clip * m / -n).half())
            for j, v in enumerate(x):
                q = min(max(round(v / s), -n), n - 1) if s != 0 else 0
                out[r, g0 + j] = q * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_signed_scale_matches_the_reference(bits):
    w = torch.randn(5, 100, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[1, :32] = 0.0  # an all-zero group
    w[2, :32] = 0.03 * torch.sign(torch.randn(32))  # ties of magnitude: the first one sets the sign
    w[3, 5], w[3, 9] = 0.4, -0.4
    fmt = get_format(f"int{bits}_ss")
    assert fmt == IntFormat(bits, signed_scale=True) and fmt.odd and finite(fmt) == finite(get_format(f"int{bits}"))
    qt = quantize_weight(w, QuantSpec(fmt, PerGroup(32)))  # 100 = 3·32 + a partial group of 4
    torch.testing.assert_close(qt.dequantize(), reference_signed(w, bits, 32), rtol=0, atol=1e-7)
    assert (qt.scale < 0).any() and (qt.scale > 0).any() and float(qt.scale[3, 0]) < 0  # 0.4 came first


def test_signed_scale_clip_and_mse_search_keep_the_sign():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    fmt = get_format("int4_ss")
    qp = fmt.choose_qparams(w.reshape(-1, 32), clip=0.8, round_scale=lambda s: s.half().float())
    ref = reference_signed(w, 4, 32, clip=0.8)
    assert torch.equal(fmt.dequantize(fmt.quantize(w.reshape(-1, 32), qp), qp).reshape(4, 64), ref)
    mse = quantize_weight(w, parse_scheme("int4_ss:g32:mse"))
    rtn = quantize_weight(w, parse_scheme("int4_ss:g32"))
    assert torch.equal(torch.sign(mse.scale), torch.sign(rtn.scale))
    assert (mse.dequantize() - w).norm() <= (rtn.dequantize() - w).norm()


def test_every_blocks_extreme_is_exact_whatever_its_sign():
    """The weight of largest magnitude sits on code -2^(b-1), so it is reproduced up to the
    scale's float16 rounding; the half rule clips a positive extreme to (2^(b-1) - 1)·s."""
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.9], [1.0, 0.5, 0.0, -0.5, -0.9]])
    ss, half = get_format("int2_ss"), get_format("int2")
    qp = ss.choose_qparams(x)
    assert qp.scale.flatten().tolist() == [0.5, -0.5]
    assert ss.dequantize(ss.quantize(x, qp), qp).tolist() == [[-1.0, -0.5, 0.0, 0.5, 0.5], [1.0, 0.5, 0.0, -0.5, -0.5]]
    qh = half.choose_qparams(x)
    assert half.dequantize(half.quantize(x, qh), qh)[1, 0] == 0.5  # 1.0 clipped


def test_signed_scale_lowers_the_weight_error_of_gaussian_groups():
    """On Gaussian groups the signed rule's error is below the half rule's at 2, 3 and 4 bits
    (SmolLM2's decoder at int4 g64: 0.0984 against 0.1031, ``bench/int_grid.py``)."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4):
        rel = {n: float((quantize_weight(w, parse_scheme(f"{n}:g64")).dequantize() - w).norm() / w.norm())
               for n in (f"int{bits}", f"int{bits}_ss")}
        assert rel[f"int{bits}_ss"] < rel[f"int{bits}"], bits


def test_signed_scale_is_for_the_full_range_symmetric_grid_only():
    with pytest.raises(LowbitError, match="signed_scale applies"):
        IntFormat(4, symmetric=False, signed_scale=True)
    with pytest.raises(LowbitError, match="signed_scale applies"):
        IntFormat(4, narrow_range=True, signed_scale=True)
    d = get_format("int4_ss").to_dict()
    assert d["signed_scale"] and format_from_dict(json.loads(json.dumps(d))) == get_format("int4_ss")
    assert format_from_dict(get_format("int4").to_dict()) == IntFormat(4)  # no signed_scale: positive


# --- format dicts written before the full range keep their meaning ----------------------------
def test_version_1_int_dict_is_the_narrow_grid():
    assert format_from_dict(V1_INT4) == get_format("int4_narrow")
    assert format_from_dict({"family": "int", "bits": 3}) == IntFormat(3, narrow_range=True)
    for name in ("int4", "int4_narrow", "uint4", "uint4_fz"):  # new dicts say which grid
        d = get_format(name).to_dict()
        assert "narrow_range" in d and format_from_dict(json.loads(json.dumps(d))) == get_format(name)
    assert format_from_dict({"family": "int", "bits": 4, "symmetric": False, "zero": "float"}) == get_format("uint4_fz")


def test_version_1_quantized_tensor_dequantizes_as_before():
    """A tensor saved by format version 1 (its spec's format dict has no ``narrow_range``)
    reloads with the restricted grid, and dequantizes to what it did then."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    old = quantize_weight(w, parse_scheme("int4_narrow:g32"))
    meta = json.loads(json.dumps(old.meta()))
    meta["spec"]["format"] = dict(V1_INT4)
    back = QuantizedTensor.from_tensors(meta, {k: v.clone() for k, v in old.to_tensors().items()})
    assert back.spec.format == get_format("int4_narrow")
    assert torch.equal(back.dequantize(), old.dequantize())
    full = quantize_weight(w, parse_scheme("int4:g32"))
    assert not torch.equal(full.dequantize(), old.dequantize())
