"""Activation quantization at inference, against slow references written from the definitions."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.nn import QuantLinear, attach, qtensors, quantize_input
from lowbit.quantizer import quantize_weight
from lowbit.scheme import ActSpec
from lowbit.schemes import parse_scheme


def per_token_int8_reference(x: torch.Tensor) -> torch.Tensor:
    """Per row, on int8's full-range grid: s = absmax / 128, q = clamp(round(x / s), -128, 127), x̂ = q · s."""
    out = torch.empty_like(x)
    for i, row in enumerate(x):
        s = row.abs().max() / 128
        out[i] = torch.clamp(torch.round(row / s), -128, 127) * s if s > 0 else row * 0
    return out


def test_per_token_int8_matches_the_definition():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48) * torch.linspace(0.1, 4, 48) + 0.3  # (batch, tokens, in): biased, uneven
    x[0, 0] = 0  # an all-zero token gives zeros, not NaN
    got = quantize_input(x, ActSpec(get_format("int8"), "token"))
    want = per_token_int8_reference(x.reshape(-1, 48)).reshape(x.shape)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.equal(got, want)


def test_per_tensor_and_group_scales_follow_the_definition():
    torch.manual_seed(1)
    x = torch.randn(4, 64) + 0.5
    s = x.abs().max() / 128  # int8's full-range grid: codes -128..127
    assert torch.equal(quantize_input(x, ActSpec(get_format("int8"), "tensor")), torch.round(x / s).clamp(-128, 127) * s)
    g = quantize_input(x, ActSpec(get_format("int8"), "group", group_size=16))
    blocks = x.reshape(4, 4, 16)
    sg = blocks.abs().amax(-1, keepdim=True) / 128
    assert torch.equal(g, (torch.round(blocks / sg).clamp(-128, 127) * sg).reshape(4, 64))


def test_static_scale_is_fixed_and_clamps():
    x = torch.tensor([[0.5, -1.0, 3.0, 0.02]])
    got = quantize_input(x, ActSpec(get_format("int8"), "tensor", dynamic=False), torch.tensor(0.01))
    assert torch.equal(got, torch.tensor([[0.5, -1.0, 1.27, 0.02]]))
    with pytest.raises(LowbitError, match="input_scale"):
        quantize_input(x, ActSpec(get_format("int8"), "tensor", dynamic=False))


@pytest.mark.parametrize("name,gran,size,tol", [("int8", "token", None, 0.01), ("int4", "group", 32, 0.15),
                                                ("fp8_e4m3fn", "token", None, 0.07), ("fp4_e2m1", "group", 32, 0.3),
                                                ("mxfp4", "group", 32, 0.3), ("nvfp4", "group", 16, 0.3)])
def test_every_format_runs_through_its_own_quantizer(name, gran, size, tol):
    torch.manual_seed(2)
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    got = quantize_input(x, ActSpec(get_format(name), gran, size))
    assert got.dtype == torch.bfloat16 and not torch.equal(got, x)
    rel = (got.float() - x.float()).norm() / x.float().norm()
    assert rel < tol


def _linear_with_act(act: ActSpec) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(3)
    lin = nn.Linear(64, 32)
    qt = quantize_weight(lin.weight, parse_scheme("int8:channel"))
    qt.input = act
    w = attach(lin, "weight", qt, torch.float32)
    return lin, w


def test_reference_path_quantizes_the_input():
    lin, w = _linear_with_act(ActSpec(get_format("int8"), "token"))
    x = torch.randn(2, 7, 64)
    want = per_token_int8_reference(x.reshape(-1, 64)).reshape(x.shape) @ w.t() + lin.bias
    assert torch.equal(lin(x), want)


def test_quant_linear_quantizes_the_input_like_the_reference():
    lin, w = _linear_with_act(ActSpec(get_format("int8"), "token"))
    qt = qtensors(lin)["weight"]
    x = torch.randn(5, 64)
    ref = lin(x)
    dequant = QuantLinear(qt, lin.bias, kernels=("dequant",))
    assert torch.allclose(dequant(x), ref, rtol=1e-5, atol=1e-5)
    fast = QuantLinear(qt, lin.bias)  # the int8 kernel: bf16 activations
    assert (fast(x) - ref).abs().max() <= 0.02 * ref.abs().max()
    assert fast.qtensor().input == qt.input


def test_input_spec_on_an_embedding_is_refused():
    emb = nn.Embedding(10, 32)
    qt = quantize_weight(emb.weight, parse_scheme("int8:channel"))
    qt.input = ActSpec(get_format("int8"), "token")
    with pytest.raises(LowbitError, match="Embedding"):
        attach(emb, "weight", qt, torch.float32)
