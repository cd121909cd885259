"""Integer grids: full-range and narrow-range symmetric tables, their scale rule against a slow
reference, and the meaning of format dicts written before the full range existed."""
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
