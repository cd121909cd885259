"""The shared quantization path: scale search, float zeros, partial groups, methods."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.algorithms.nupes import nupes
from lowbit.formats import get_format
from lowbit.formats.grid import PowerFormat
from lowbit.quantizer import quantize_weight
from lowbit.spec import PerBlock, PerChannel, PerGroup, PerTensor, QuantSpec


def q4_1_grid_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights exactly as a GGUF Q4_1 file dequantizes them: d·q + m, d and m in fp16, block 32."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols // 32
    d = (torch.rand(n, 1, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(n, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n, 32), generator=g).float()
    q[:, 0], q[:, 1] = 0, 15  # every block spans the whole grid, as Q4_1 blocks do
    return (d * q + m).reshape(rows, cols)


def test_float_zero_reproduces_a_q4_1_grid_exactly():
    w = q4_1_grid_weight(16, 128)
    fz = quantize_weight(w, QuantSpec(get_format("uint4_fz"), PerGroup(32))).dequantize()
    assert torch.equal(fz, w)
    iz = quantize_weight(w, QuantSpec(get_format("uint4"), PerGroup(32))).dequantize()
    assert not torch.equal(iz, w)  # an integer zero point cannot sit on the block minimum


@pytest.mark.parametrize("search,p", [("mse", 2.0), ("lp3", 3.0), ("lp2.4", 2.4)])
@pytest.mark.parametrize("fmt", ["int3", "uint4", "uint4_fz", "fp4_e2m1", "nf4", "int2"])
def test_scale_search_never_worse_than_minmax_per_block(fmt, search, p):
    """Ratio 1.0 is among the candidates, so per block the search can only lower its norm."""
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails
    errs = {}
    for s in ("minmax", search):
        d = quantize_weight(w, QuantSpec(get_format(fmt), PerGroup(32), scale_search=s)).dequantize()
        errs[s] = (d - w).abs().pow(p).reshape(32, 3, 32).sum(-1)  # per block
    assert (errs[search] <= errs["minmax"] * (1 + 1e-6)).all()
    assert errs[search].sum() < errs["minmax"].sum()


def test_partial_final_group_matches_separate_quantization():
    """576 inputs at g128: four groups of 128 and one of 64, each quantized on its own."""
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(2))
    spec = QuantSpec(get_format("uint4"), PerGroup(128))
    qt = quantize_weight(w, spec)
    assert qt.scale.shape == (8, 5)
    tail = quantize_weight(w[:, 512:], QuantSpec(get_format("uint4"), PerGroup(64)))
    assert torch.equal(qt.dequantize()[:, 512:], tail.dequantize())
    head = quantize_weight(w[:, :512], spec)
    assert torch.equal(qt.dequantize()[:, :512], head.dequantize())
    assert spec == QuantSpec.from_dict(spec.to_dict())


@pytest.mark.parametrize("fmt", ["int8", "uint3", "fp4_e2m1"])
@pytest.mark.parametrize("shape,tile", [((10, 13), (4, 5)), ((7, 9), (7, 4)), ((12, 8), (3, 8))])
def test_2d_blocks_match_a_per_tile_reference(fmt, shape, tile):
    """Slow reference: cut every (possibly partial) tile out by hand and quantize it as one block."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    qt = quantize_weight(w, QuantSpec(get_format(fmt), PerBlock(*tile)))
    got = qt.dequantize()
    assert qt.scale.shape == (-(-shape[0] // tile[0]), -(-shape[1] // tile[1]))
    for i in range(0, shape[0], tile[0]):
        for j in range(0, shape[1], tile[1]):
            t = w[i:i + tile[0], j:j + tile[1]]
            one = quantize_weight(t.reshape(1, -1), QuantSpec(get_format(fmt), PerTensor())).dequantize()
            assert torch.equal(got[i:i + tile[0], j:j + tile[1]], one.reshape(t.shape)), (i, j)


def test_bits_per_weight_counts_scales_and_zeros():
    w = torch.randn(4, 576)
    assert quantize_weight(w, QuantSpec(get_format("int4"), PerGroup(128))).nbits() == 4 * 576 * 4 + 4 * 5 * 16
    assert quantize_weight(w, QuantSpec(get_format("uint4"), PerGroup(64))).nbits() == 4 * 576 * 4 + 4 * 9 * (16 + 4)
    assert quantize_weight(w, QuantSpec(get_format("uint4_fz"), PerGroup(32))).bits_per_weight() == 4 + 32 / 32
    assert quantize_weight(w, QuantSpec(get_format("mxfp4"), PerGroup(32))).bits_per_weight() == 4 + 8 / 32
    assert quantize_weight(w, QuantSpec(get_format("nvfp4"), PerGroup(16))).nbits() == 4 * 576 * 4 + 144 * 8 + 32


def test_same_input_same_codes():
    w = torch.randn(64, 64)
    a = quantize_weight(w, QuantSpec(get_format("nf4"), PerGroup(64), scale_search="mse"))
    b = quantize_weight(w.clone(), QuantSpec(get_format("nf4"), PerGroup(64), scale_search="mse"))
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)


def test_nupes_method_is_never_worse_than_uniform():
    """The search includes a = 1, where the power grid equals the odd (narrow-range) int grid."""
    w = torch.distributions.StudentT(3.0).sample((64, 128))
    spec = QuantSpec(get_format("int4"), PerChannel())
    qt = nupes(w, spec)
    assert isinstance(qt.spec.format, PowerFormat) and 0.2 <= qt.spec.format.a <= 1.0
    err_pow = (qt.dequantize() - w).pow(2).sum()
    err_int = (quantize_weight(w, QuantSpec(get_format("int4_narrow"), PerChannel())).dequantize() - w).pow(2).sum()
    assert err_pow <= err_int
    # a = 1 is the narrow uniform grid (up to float rounding of the two scale parametrizations)
    f32 = QuantSpec(get_format("int4_narrow"), PerChannel(), scale_dtype="float32")
    uniform = QuantSpec(PowerFormat(4, 1.0), PerChannel(), scale_dtype="float32")
    assert torch.allclose(quantize_weight(w, uniform).dequantize(), quantize_weight(w, f32).dequantize(), atol=1e-5)


def test_model_level_nupes_records_each_exponent(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    lowbit.quantize(model, "int4:channel", method="nupes", progress=False)
    from lowbit.nn.reference import quantized_tensors

    exps = [qt.spec.format.a for _, _, qt, _ in quantized_tensors(model)]
    assert len(exps) == 2 and all(0 < a <= 1 for a in exps)
    with pytest.raises(lowbit.LowbitError, match="unknown method"):
        lowbit.quantize(model, "int4:channel", method="magic", progress=False)
