"""Fake quantization: forward = PTQ bit for bit; STE and LSQ gradients against independent references."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import get_format
from lowbit.qat import FakeQuantLinear
from lowbit.quantizer import quantize_weight
from lowbit.schemes import parse_scheme
from lowbit.spec import PerGroup, QuantSpec

FREEZE_SPECS = ["int4:g32", "uint4:g64", "nf4:g32", "fp8_e4m3fn:channel", "mxfp4", "nvfp4", "uint4_fz:g64:hqq",
                "int4:g32:mse", "int3:b8x16", "pow4_a0.5:g32", "ternary:g32"]


def layer(seed: int = 0, out_f: int = 40, in_f: int = 96) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def same_qtensor(a, b) -> bool:
    zeros = (a.zero is None and b.zero is None) or torch.equal(a.zero, b.zero)
    gs = (a.global_scale is None and b.global_scale is None) or torch.equal(a.global_scale, b.global_scale)
    return (a.spec == b.spec and a.shape == b.shape and a.layout == b.layout and torch.equal(a.packed, b.packed)
            and torch.equal(a.scale, b.scale) and zeros and gs)


@pytest.mark.parametrize("scheme", FREEZE_SPECS)
@pytest.mark.parametrize("learn", [False, True])
def test_untrained_freeze_is_rtn_and_forward_is_the_frozen_layer(scheme, learn, single_thread):
    spec = parse_scheme(scheme)
    if learn and spec.format.family == "mx":
        pytest.skip("MX scales are not learnable (tested below)")
    lin = layer()
    fq = FakeQuantLinear(lin, spec, learn_scale=learn)
    qt = fq.freeze()
    assert same_qtensor(qt, quantize_weight(lin.weight, spec))
    x = torch.randn(5, 96)
    assert torch.equal(fq(x), nn.functional.linear(x, qt.dequantize(), lin.bias))


def test_conv1d_layout(single_thread):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 64)  # weight (in=64, out=48)
    spec = parse_scheme("int4:g32")
    fq = FakeQuantLinear(conv, spec, learn_scale=True, layout="transposed")
    qt = fq.freeze()
    assert same_qtensor(qt, quantize_weight(conv.weight, spec, "transposed"))
    x = torch.randn(2, 3, 64)
    w = qt.dequantize()
    assert torch.equal(fq(x), (torch.addmm(conv.bias, x.view(-1, 64), w)).view(2, 3, 48))


@pytest.mark.parametrize("name", ["mxfp4", "binary"])
def test_unlearnable_scales_are_refused(name):
    fmt = get_format(name)
    spec = QuantSpec(fmt, PerGroup(32))
    with pytest.raises(LowbitError, match=f"cannot learn the scale of {name}.*learn_scale=False"):
        FakeQuantLinear(layer(), spec, learn_scale=True, name="fc")
    FakeQuantLinear(layer(), spec, learn_scale=False)  # STE on the weights works for every format


def test_ste_passes_gradient_inside_the_range_only(single_thread):
    """int4 symmetric, one block of 8 with a chosen scale: |x| <= 7s gets the upstream gradient, beyond gets 0."""
    spec = QuantSpec(get_format("int4"), PerGroup(8), scale_dtype="float32")
    lin = nn.Linear(8, 1, bias=False)
    fq = FakeQuantLinear(lin, spec, learn_scale=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1.0, -0.7, -0.69, 0.0, 0.3, 0.7, 0.71, 2.0]]))
        fq.scale.fill_(0.1)  # range [-0.7, 0.7]
    up = torch.arange(1.0, 9.0)
    (fq.fake_weight()[0] * up).sum().backward()
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(lin.weight.grad[0], up * inside)


def lsq_reference(v: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int) -> torch.Tensor:
    """LSQ's published pseudocode (Esser et al., arXiv:1902.08153, appendix), for one block: autograd
    through gradscale / hardtanh / roundpass."""
    g = 1.0 / math.sqrt(v.numel() * q_p)
    s = (s - s * g).detach() + s * g  # gradscale
    u = torch.nn.functional.hardtanh(v / s, -q_n, q_p)
    return ((u.round() - u).detach() + u) * s  # roundpass


def grid_reference(v: torch.Tensor, s: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The same with rounding to the nearest value of a non-uniform grid (argmin, passed straight through)."""
    g = 1.0 / math.sqrt(v.numel() * int((grid > 0).sum()))
    s = (s - s * g).detach() + s * g
    u = torch.nn.functional.hardtanh(v / s, float(grid.min()), float(grid.max()))
    nearest = grid[(u.detach()[..., None] - grid).abs().argmin(-1)]
    return ((nearest - u).detach() + u) * s


def lsq_case(fmt_name: str, signed: bool):
    torch.manual_seed(3)
    w = torch.randn(4, 16) * (1.0 if signed else 0.0) + (0.0 if signed else torch.rand(4, 16))
    spec = QuantSpec(get_format(fmt_name), PerGroup(16), scale_dtype="float32")
    lin = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    fq = FakeQuantLinear(lin, spec, learn_scale=True)  # uint4 on positive blocks: zero point 0
    if fq.zero is not None:
        assert not fq.zero.any()
    with torch.no_grad():
        fq.scale.copy_(torch.tensor([[0.21], [0.37], [0.05], [0.11]]) * (1 if signed else 0.2))  # some clipping
    up = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    (fq.fake_weight() * up).sum().backward()
    return w, fq, lin, up


@pytest.mark.parametrize("fmt_name,signed", [("int4", True), ("int3", True), ("uint4", False)])
def test_lsq_gradients_match_the_paper(fmt_name, signed, single_thread):
    w, fq, lin, up = lsq_case(fmt_name, signed)
    fmt = get_format(fmt_name)
    q_n, q_p = (-fmt.qmin, fmt.qmax) if signed else (0, fmt.qmax)  # full-range int: Q_N = 2^(b-1) as in the paper
    for r in range(4):
        v = w[r].clone().requires_grad_(True)
        s = fq.scale.detach()[r, 0].clone().requires_grad_(True)
        ref = lsq_reference(v, s, q_n, q_p)
        assert torch.equal(ref.detach(), fq.fake_weight()[r].detach())
        (ref * up[r]).sum().backward()
        assert torch.allclose(fq.scale.grad[r, 0], s.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(lin.weight.grad[r], v.grad, rtol=1e-6, atol=0)  # the reference goes through v/s·s
        assert torch.equal(lin.weight.grad[r] == 0, v.grad == 0)


def test_lsq_gradient_on_a_nonuniform_grid(single_thread):
    """fp4 e2m1 (values 0, .5, 1, 1.5, 2, 3, 4, 6): the round-through gradient on its own grid."""
    w, fq, lin, up = lsq_case("fp4_e2m1", True)
    grid = get_format("fp4_e2m1").values().float()
    for r in range(4):
        v = w[r].clone().requires_grad_(True)
        s = fq.scale.detach()[r, 0].clone().requires_grad_(True)
        ref = grid_reference(v, s, grid)
        (ref * up[r]).sum().backward()
        assert torch.allclose(fq.scale.grad[r, 0], s.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(lin.weight.grad[r], v.grad, rtol=1e-6, atol=0)  # the reference goes through v/s·s
        assert torch.equal(lin.weight.grad[r] == 0, v.grad == 0)


def test_lsq_scale_gradient_by_hand():
    """One int4 block [0.25, -1.0, 0.52] with s = 0.1, upstream 1, g = 1/sqrt(3·Q_P) = 1/sqrt(3·7):
    v = 2.5 (round 2: -0.5), -10 (clamped: -Q_N = -8), 5.2 (round 5: -0.2) -> (-0.5 - 8 - 0.2)·g."""
    spec = QuantSpec(get_format("int4"), PerGroup(3), scale_dtype="float32")
    lin = nn.Linear(3, 1, bias=False)
    fq = FakeQuantLinear(lin, spec, learn_scale=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.25, -1.0, 0.52]]))
        fq.scale.fill_(0.1)
    fq.fake_weight().sum().backward()
    expected = (-0.5 - 8 - 0.2) / math.sqrt(3 * 7)
    assert fq.scale.grad.item() == pytest.approx(expected, rel=1e-5)
    assert lin.weight.grad.tolist() == [[1.0, 0.0, 1.0]]


def test_learned_scale_rounds_to_its_storage_and_freezes_it(single_thread):
    spec = parse_scheme("int4:g32")  # fp16 scales
    lin = layer()
    fq = FakeQuantLinear(lin, spec, learn_scale=True)
    with torch.no_grad():
        fq.scale.mul_(0.9137)  # no longer fp16 values
    qt = fq.freeze()
    assert torch.equal(qt.scale, qt.scale.half().float())
    x = torch.randn(5, 96)
    assert torch.equal(fq(x), nn.functional.linear(x, qt.dequantize(), lin.bias))
