"""QuantizedTensor's open roles: mask, low-rank factors, input spec and static input scale."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.nn import QuantLinear, attach, attach_mask, masks, qtensors
from lowbit.nn.quant_linear import mask_is_free
from lowbit.qtensor import QuantizedTensor
from lowbit.quantizer import quantize_weight
from lowbit.scheme import ActSpec
from lowbit.schemes import parse_scheme


def pruned(shape=(32, 64), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    w = torch.randn(shape) + 0.2  # biased: zeros sit off-centre for asymmetric formats
    mask = torch.rand(shape) > 0.5
    return w * mask, mask


def with_roles(spec: str = "uint4:g32", static: bool = True) -> QuantizedTensor:
    w, mask = pruned()
    torch.manual_seed(1)
    qt = quantize_weight(w, parse_scheme(spec))
    act = ActSpec(get_format("int8"), "tensor", dynamic=not static)
    return replace(qt, mask=mask, lowrank_a=torch.randn(32, 4, dtype=torch.float16) * 0.01,
                   lowrank_b=torch.randn(4, 64, dtype=torch.float16), input=act,
                   input_scale=torch.tensor(0.02) if static else None)


def test_dequantize_masks_and_adds_the_low_rank_term():
    qt = with_roles()
    plain = replace(qt, mask=None, lowrank_a=None, lowrank_b=None).dequantize()
    want = plain * qt.mask + qt.lowrank_a.float() @ qt.lowrank_b.float()
    assert torch.equal(qt.dequantize(), want)


def test_every_role_round_trips_and_is_counted():
    qt = with_roles()
    stored = qt.to_tensors()
    assert set(stored) == {"codes", "scale", "zero", "mask", "lowrank_a", "lowrank_b", "input_scale"}
    assert stored["mask"].numel() == 32 * 64 // 8  # one bit per weight
    back = QuantizedTensor.from_tensors(qt.meta(), stored)
    assert torch.equal(back.mask, qt.mask) and torch.equal(back.lowrank_a, qt.lowrank_a)
    assert back.input == qt.input and torch.equal(back.input_scale, qt.input_scale)
    assert torch.equal(back.dequantize(), qt.dequantize())
    base = replace(qt, mask=None, lowrank_a=None, lowrank_b=None, input=None, input_scale=None).nbits()
    pruned = int((~qt.mask).sum())  # a sparse tensor stores its kept weights' 4-bit codes only, plus the mask
    assert qt.nbits() == base - 4 * pruned + 32 * 64 + (32 * 4 + 4 * 64) * 16 + 32


def test_unknown_and_missing_roles_are_named():
    qt = with_roles()
    with pytest.raises(LowbitError, match="layers.0.up has a stored role 'sparse_index'"):
        QuantizedTensor.from_tensors(qt.meta(), {**qt.to_tensors(), "sparse_index": torch.zeros(1)}, name="layers.0.up")
    partial = {k: v for k, v in qt.to_tensors().items() if k != "lowrank_b"}
    with pytest.raises(LowbitError, match="lowrank_b"):
        QuantizedTensor.from_tensors(qt.meta(), partial, name="layers.0.up")


def test_bad_roles_are_refused():
    qt = with_roles()
    with pytest.raises(LowbitError, match="pairs"):
        replace(qt, lowrank_b=None)
    with pytest.raises(LowbitError, match="bool"):
        replace(qt, mask=qt.mask.float())
    with pytest.raises(LowbitError, match="input_scale"):
        replace(qt, input_scale=None)


@pytest.mark.parametrize("spec,free", [("int4:g32", True), ("int8:channel", True), ("uint4:g32", False)])
def test_quant_linear_serves_every_role(spec, free):
    qt = with_roles(spec)
    assert mask_is_free(qt) is free  # symmetric grids hold a pruned zero exactly
    lin = nn.Linear(64, 32)
    attach(lin, "weight", qt, torch.float32)
    x = torch.randn(3, 64)
    ref = lin(x)
    layer = QuantLinear(qt, lin.bias)
    assert layer.kernel.NAME == ({"int4:g32": "int4", "int8:channel": "int8"}.get(spec) if free else "dequant")
    assert (layer(x) - ref).abs().max() <= 0.02 * ref.abs().max()
    assert torch.allclose(QuantLinear(qt, lin.bias, kernels=("dequant",))(x), ref, rtol=1e-5, atol=1e-5)
    back = layer.qtensor()
    assert torch.equal(back.packed, qt.packed) and torch.equal(back.mask, qt.mask)


def test_float_masks_are_checked_and_listed():
    w, mask = pruned()
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    with pytest.raises(LowbitError, match="shape"):
        attach_mask(lin, "weight", mask[:1])
    with pytest.raises(LowbitError, match="nonzero"):
        attach_mask(lin, "weight", ~mask)
    attach_mask(lin, "weight", mask)
    assert [(n, p) for n, p, _ in masks(nn.Sequential(lin))] == [("0", "weight")]
    qt = quantize_weight(lin.weight, parse_scheme("int4:g32"))
    attach(lin, "weight", qt, torch.float32)  # prune, then quantize: the mask moves into the QuantizedTensor
    assert torch.equal(qtensors(lin)["weight"].mask, mask) and not list(masks(lin))
