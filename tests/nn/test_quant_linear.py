"""QuantLinear against the dequantize reference, on odd shapes, for every kernel.

Tolerance. The dequant kernel computes in float32 and matches ``x @ Ŵᵀ`` to float32 rounding.
The int8 and int4 kernels (PyTorch's CPU ops) take bf16 activations, bf16 per-group
scale/offset pairs (int4) and return bf16 outputs, so each output carries a relative error of a
few 2^-9; the tests require ``‖y − y_ref‖ ≤ 1e-2·‖y_ref‖`` and every element within
``2e-2·max|y_ref|``. (Measured: 3e-3 to 5e-3 relative.)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn.reference import quantized_tensors
from lowbit.nn import QuantLinear, kernel_counts, pack_model
from lowbit.nn import kernel_dequant

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402

SHAPES = [(7, 64), (33, 96), (17, 200), (48, 576), (16, 40)]  # (out, in): odd rows, partial groups, K % 16 != 0
KERNEL_OF = {
    "int8:channel": "int8", "int8:tensor": "int8",
    "int4:g32": "int4", "uint4:g64": "int4", "uint4_fz:g128": "int4", "int3:g64": "int4", "int2:g32": "int4",
    "uint4:channel": "int4", "int4:tensor": "int4", "int4_ss:g64": "int4", "int3_ss:g32": "int4",
    "int8_ss:channel": "int8",
    "int4:g16": "dequant", "nf4:g32": "dequant", "fp8": "dequant", "int8:g32": "dequant", "nvfp4": "dequant",
    "mxfp4": "dequant", "int4:b4x32": "dequant", "fp4": "dequant",
}


def quantized_linear(scheme: str, out_f: int, in_f: int, bias: bool = True) -> tuple[nn.Linear, object]:
    torch.manual_seed(out_f * 1000 + in_f)
    lin = nn.Linear(in_f, out_f, bias=bias)
    lowbit.quantize(lin, [lowbit.Rule("^$", lowbit.parse_scheme(scheme))], progress=False)
    (_, _, qt, _), = quantized_tensors(lin)
    return lin, qt


def fits(scheme: str, in_f: int) -> bool:
    """Whether ``scheme`` can quantize ``in_f`` inputs: a group no wider than them, whole MX/NVFP4 blocks."""
    spec = lowbit.parse_scheme(scheme)
    size = getattr(spec.granularity, "size", 1)
    return size <= in_f and in_f % (spec.format.fixed_block or 1) == 0


CASES = [(scheme, shape) for scheme in KERNEL_OF for shape in SHAPES if fits(scheme, shape[1])]


def close(y: torch.Tensor, ref: torch.Tensor, kernel: str) -> None:
    if kernel == "dequant":
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        return
    assert (y - ref).norm() <= 1e-2 * ref.norm()
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("scheme,shape", CASES, ids=[f"{c}-{s[0]}x{s[1]}" for c, s in CASES])
def test_kernel_matches_dequantize_reference(scheme, shape):
    lin, qt = quantized_linear(scheme, *shape)
    q = QuantLinear(qt, lin.bias)
    assert q.kernel.NAME == KERNEL_OF[scheme]
    x = torch.randn(3, 5, shape[1])
    ref = (x.double() @ qt.dequantize(torch.float64).t() + lin.bias.double()).float()
    close(q(x), ref, q.kernel.NAME)


@pytest.mark.parametrize("scheme", ["uint4:g32", "uint4_fz:g64", "int8:channel"])
def test_kernels_on_biased_weights_and_inputs(scheme):
    """Weights centred far from zero and all-positive inputs: a bias in the rounded offsets
    (bf16 offsets of the asymmetric int4 path) adds up along K instead of cancelling."""
    torch.manual_seed(5)
    lin = nn.Linear(512, 64)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(64, 512) * 0.02 + 0.05)  # in [0.05, 0.07]: offsets dominate
    lowbit.quantize(lin, [lowbit.Rule("^$", lowbit.parse_scheme(scheme))], progress=False)
    (_, _, qt, _), = quantized_tensors(lin)
    q = QuantLinear(qt, lin.bias)
    x = torch.rand(4, 512) + 0.5  # positive: errors of one sign accumulate
    ref = (x.double() @ qt.dequantize(torch.float64).t() + lin.bias.double()).float()
    y = q(x)
    assert q.kernel.NAME == KERNEL_OF.get(scheme, "int4")
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert (y - ref).mean().abs() <= 2e-3 * ref.abs().mean()  # no systematic offset


@pytest.mark.parametrize("scheme", list(KERNEL_OF))
def test_qtensor_round_trip_is_bit_exact(scheme):
    lin, qt = quantized_linear(scheme, 33, 160)  # every scheme fits 160 inputs (g128 leaves a partial group)
    back = QuantLinear(qt, lin.bias).qtensor()
    assert torch.equal(back.packed, qt.packed)
    assert torch.equal(back.scale, qt.scale)
    assert (back.zero is None) == (qt.zero is None) and (qt.zero is None or torch.equal(back.zero, qt.zero))
    assert back.spec == qt.spec and back.shape == qt.shape


def test_packed_memory_follows_bits_per_weight():
    n, k = 256, 512
    fp32 = n * k * 4
    for scheme, most in (("int8:channel", 0.27), ("int4:g128", 0.16), ("int4:g32", 0.19)):
        _, qt = quantized_linear(scheme, n, k, bias=False)
        q = QuantLinear(qt)
        assert q.nbytes() <= most * fp32, (scheme, q.nbytes() / fp32)


def test_dequant_kernel_works_by_row_chunks(monkeypatch):
    """With a tiny chunk the fallback walks many chunks (3-bit codes cross bytes) and still matches."""
    lin, qt = quantized_linear("int3:b4x32", 37, 96)
    monkeypatch.setattr(kernel_dequant, "CHUNK_ELEMENTS", 96 * 8)
    assert kernel_dequant.chunk_rows(qt) == 8
    seen = []
    real = kernel_dequant.row_chunk
    monkeypatch.setattr(kernel_dequant, "row_chunk", lambda qt, r0, r1: seen.append(r1 - r0) or real(qt, r0, r1))
    x = torch.randn(4, 96)
    q = QuantLinear(qt, lin.bias)
    ref = x @ qt.dequantize().t() + lin.bias
    close(q(x), ref, "dequant")
    assert max(seen) == 8 and sum(seen) == 37


def test_pack_model_keeps_ties_and_matches_fake_quant():
    model = families.llama().eval()
    x = families.example_input("llama")
    lowbit.quantize(model, "w4g32", progress=False)
    lowbit.quantize(model, [lowbit.Rule("^lm_head$", lowbit.parse_scheme("int8:channel"))], progress=False)
    ref = families.output(model, x)
    pack_model(model)
    assert kernel_counts(model) == {"int4": 14}  # the tied lm_head/embedding stays on the reference path
    assert model.lm_head.weight is model.model.embed_tokens.weight
    close(families.output(model, x), ref, "int4")


def test_bf16_model_and_gpt2_conv1d():
    model = families.gpt2().eval()
    x = families.example_input("gpt2")
    lowbit.quantize(model, "int8:channel", progress=False)
    ref = families.output(model, x)
    pack_model(model)
    assert kernel_counts(model) == {"int8": 8}  # c_attn, c_proj, c_fc, mlp.c_proj per block
    close(families.output(model, x), ref, "int8")
    model.to(torch.bfloat16)
    assert families.output(model, x).dtype == torch.bfloat16


def test_cpu_kernels_refuse_other_devices_clearly():
    _, qt = quantized_linear("int4:g32", 16, 64)
    q = QuantLinear(qt).to("meta")
    with pytest.raises(lowbit.LowbitError, match="packed=False"):
        q(torch.empty(2, 64, device="meta"))


@pytest.mark.parametrize("scheme", ["int8:channel", "uint4:g32", "nf4:g32"])
def test_copies_pickles_and_dtype_moves_keep_the_codes(scheme, tmp_path):
    import copy

    lin, qt = quantized_linear(scheme, 48, 96)
    q = QuantLinear(qt, lin.bias)
    x = torch.randn(2, 96)
    y = q(x)
    twin = copy.deepcopy(q)
    assert torch.equal(twin(x), y)
    torch.save(q, tmp_path / "q.pt")  # a pickle of the layer loads back and computes the same,
    allowed = [QuantLinear, type(qt.spec), type(qt.spec.granularity), type(qt.spec.format)]  # allowing lowbit's
    with torch.serialization.safe_globals(allowed):  # own classes only, never arbitrary pickle code
        loaded = torch.load(tmp_path / "q.pt", weights_only=True)
    assert torch.equal(loaded(x), y) and torch.equal(loaded.qtensor().packed, qt.packed)
    for dtype in (torch.bfloat16, torch.float16):
        moved = copy.deepcopy(q).to(dtype)
        assert moved.dtype == dtype and moved.bias.dtype == dtype
        back = moved.qtensor()  # stored scales keep their encoding: still bit-exact
        assert torch.equal(back.packed, qt.packed) and torch.equal(back.scale, qt.scale)
        assert moved(x.to(dtype)).dtype == dtype
