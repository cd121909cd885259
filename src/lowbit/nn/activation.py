"""Activation quantization at inference: fake-quantize a layer's input as its ``ActSpec`` says.

The input ``x`` (..., in_features) is viewed as a (tokens, in_features) matrix and rounded
through the format's own ``choose_qparams`` / ``quantize`` / ``dequantize`` (the same calls
that quantize weights), so every registered format works: int8, int4, fp8, fp4, MX, NVFP4.

=============  =====================  ==============================================
granularity    dynamic scale          static scale (``input_scale``)
=============  =====================  ==============================================
``tensor``     absmax of the input    one calibrated float32 scale, stored with the layer
``token``      one per row            (dynamic only)
``group``      one per ``g`` inputs   (dynamic only)
=============  =====================  ==============================================

The result has ``x``'s shape and dtype; the rounding runs in float32. Scales are kept in
float32 (``ActSpec.quant_spec``), except where the format dictates its own (MX: e8m0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.base import Format, QParams
from lowbit.grouping import from_blocks, regions, to_blocks
from lowbit.quantizer import choose_qparams
from lowbit.scheme import ActSpec
from lowbit.spec import tile_of


def quantize_input(x: Tensor, spec: ActSpec, input_scale: Tensor | None = None) -> Tensor:
    """Fake-quantize ``x`` (..., in_features) float -> same shape and dtype.

    ``input_scale`` () float32: the static per-tensor scale (required when ``spec.dynamic`` is
    False, ignored otherwise).
    """
    m = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in_features)
    if spec.dynamic:
        out = fake_quantize_dynamic(m, spec)
    else:
        if input_scale is None:
            raise LowbitError(f"static {spec.format.name} input quantization needs its calibrated input_scale; "
                              "calibrate the layer or use a dynamic activation spec")
        out = fake_quantize_static(m, spec, input_scale)
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize_dynamic(m: Tensor, spec: ActSpec) -> Tensor:
    """(tokens, in) float32 -> (tokens, in) float32, scales computed from ``m`` itself."""
    qspec = spec.quant_spec()
    fmt = qspec.format
    if m.numel() == 0:
        return m.clone()
    gscale = fmt.global_scale(m)  # NVFP4's tensor-wide second level; None for other formats
    out = torch.empty_like(m)
    for region in regions(tuple(m.shape), tile_of(qspec.granularity, *m.shape)):
        blocks = to_blocks(m, region)  # (n_blocks, block_size)
        qp = choose_qparams(blocks, qspec, gscale)
        from_blocks(fmt.dequantize(fmt.quantize(blocks, qp), qp), region, out)
    return out


def fake_quantize_static(m: Tensor, spec: ActSpec, input_scale: Tensor) -> Tensor:
    """(tokens, in) float32 -> (tokens, in) float32 with one fixed per-tensor scale."""
    fmt = spec.format
    if fmt.zero_kind is not None or type(fmt).global_scale is not Format.global_scale:
        raise LowbitError(f"static input quantization stores one scale; {fmt.name} needs zero points or a "
                          "second scale level: use a symmetric format (int8, fp8_e4m3fn) or a dynamic spec")
    scale = input_scale.reshape(1, 1).to(device=m.device, dtype=torch.float32)
    blocks = m.reshape(1, -1)  # one block: the whole tensor
    qp = QParams(scale.expand(1, 1))
    return fmt.dequantize(fmt.quantize(blocks, qp), qp).reshape(m.shape)


def static_scale(sample: Tensor, spec: ActSpec) -> Tensor:
    """() float32 per-tensor min-max scale of calibration inputs ``sample`` (..., in_features)."""
    m = sample.reshape(1, -1).to(torch.float32)
    return choose_qparams(m, spec.quant_spec()).scale.reshape(())
