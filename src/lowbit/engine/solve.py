"""Solve one targeted tensor with a modifier and put the result into the model.

``solve_target`` takes the tensor's float32 matrix view, calls the modifier's ``solve_layer``
(per expert for fused MoE tensors, each with its own statistics), and ``apply_result`` writes
what came back: a quantized weight is packed into a ``QuantizedTensor`` and attached (the
module then computes with its dequantized copy), a float weight is written in place.

``refine_target`` serves the methods that change a weight an earlier stage quantized (``refines``,
LoRC): ``solve_target(..., keep=True)`` keeps the float matrix view beside the quantized tensor,
and ``refine_target`` hands both to ``refine_layer`` and attaches what comes back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.targets import Target
from lowbit.modifiers.base import LayerResult, Modifier
from lowbit.nn.reference import attach, attach_mask, float_masks, keep_float, pop_float, qtensors
from lowbit.qtensor import QuantizedTensor, from_matrix, matrix_view
from lowbit.quantizer import check_weight, pack_matrix, quantize_matrix
from lowbit.scheme import TensorScheme
from lowbit.spec import tile_of


@dataclass
class Solved:
    """One tensor a stage changed: the quantized tensor attached, or None for a float change."""

    target: Target
    qtensor: QuantizedTensor | None
    dtype: torch.dtype


def solve_target(modifier: Modifier, target: Target, module: nn.Module, scheme: TensorScheme, stats: Any,
                 report: Any, keep: bool = False) -> Solved | None:
    """Solve ``target`` (its weight read from ``module``) and apply the result; None if unchanged.

    stats: the layer's accumulator, a dict expert -> accumulator for fused experts, or None.
    keep:  a later stage refines this tensor: keep its float matrix view (``keep_float``) when it
           gets quantized.
    """
    w = getattr(module, target.param)
    if isinstance(w, torch.Tensor) and not isinstance(w, nn.Parameter) and target.quantized:
        raise LowbitError(f"{target.key} is already quantized; a later stage cannot change it")
    m = matrix_view(w.detach().to(torch.float32), target.layout)  # (rows, cols)
    if scheme.weight is not None:
        check_weight(m, scheme.weight, *m.shape, target.key)
    t0 = time.perf_counter()
    if target.kind == "experts" and modifier.needs_data:
        result = _solve_experts(modifier, target, w, m, scheme, stats or {}, report)
    else:
        prior = float_masks(module).get(target.param) if modifier.keeps_mask else None
        extra = {} if prior is None else {"keep": matrix_view(prior, target.layout).to(m.device)}
        result = modifier.solve_layer(m, stats, scheme, target.key, **extra)
        if result is not None:
            report.layers.append({"key": target.key, "method": modifier.name, **result.info,
                                  "seconds": round(time.perf_counter() - t0, 3)})
    if result is None:
        return None
    solved = apply_result(module, target, w, result, scheme)
    if keep and solved.qtensor is not None:
        keep_float(module, target.param, m)
    return solved


def refine_target(modifier: Modifier, target: Target, module: nn.Module, scheme: TensorScheme,
                  report: Any) -> Solved | None:
    """A ``refines`` method on ``target``, which an earlier stage quantized and kept the float
    weight of; attaches the refined QuantizedTensor. None for a tied twin refined already."""
    qt = qtensors(module).get(target.param)
    W = pop_float(module, target.param)
    if qt is None:
        raise LowbitError(f"{target.key} is not quantized; method {modifier.name} corrects a weight an earlier "
                          f"stage quantized, so put a quantizing method first (e.g. rtn+{modifier.name})")
    if W is None:
        if qt.rank:
            return None  # the tied twin of a tensor refined earlier in this stage
        raise LowbitError(f"{target.key}: its float weight was not kept for method {modifier.name}; run the "
                          "quantizing method and it in one recipe (e.g. gptq+lorc)")
    t0 = time.perf_counter()
    dtype = getattr(module, target.param).dtype
    new = modifier.refine_layer(W.to(torch.float32), qt, scheme, target.key)
    report.layers.append({"key": target.key, "method": modifier.name, "rank": new.rank,
                          "seconds": round(time.perf_counter() - t0, 3)})
    attach(module, target.param, new, dtype)
    return Solved(target, new, dtype)


def apply_result(module: nn.Module, target: Target, w: Tensor, result: LayerResult,
                 scheme: TensorScheme | None = None) -> Solved:
    """Write ``result`` into ``module.<param>`` (``w`` is its current tensor).

    A quantized result is attached with its mask (``result.mask``, or the mask an earlier pruning
    stage recorded) and the scheme's input-activation spec; a float result is copied into the
    weight, and its mask recorded (``attach_mask``).
    """
    shape = tuple(w.shape)
    mask = None if result.mask is None else from_matrix(result.mask, shape, target.layout)
    if result.quantized:
        qt = pack_matrix(result.spec, shape, target.layout, result.codes, result.scale, result.zero,
                         result.global_scale)
        if mask is not None:
            qt = replace(qt, mask=mask.cpu())
        if scheme is not None and scheme.input is not None:
            qt = replace(qt, input=scheme.input)
        attach(module, target.param, qt, w.dtype)
        return Solved(target, qt, w.dtype)
    if result.weight is None:
        raise LowbitError(f"{target.key}: the method returned neither codes nor a weight")
    with torch.no_grad():
        w.copy_(from_matrix(result.weight, shape, target.layout).to(w.dtype))
    if mask is not None:
        attach_mask(module, target.param, mask)
    return Solved(target, None, w.dtype)


def _solve_experts(modifier: Modifier, target: Target, w: Tensor, full: Tensor, scheme: TensorScheme,
                   stats: dict[int, Any], report: Any) -> LayerResult | None:
    """Fused experts (E, out, in), ``full`` their (E·out, in) view: each expert solved with its own
    statistics, then stacked. A quantizing method's idle experts (no routed token) are rounded to
    nearest; a pruning method leaves them as they are. Both are reported as fallbacks."""
    n_exp, out = w.shape[0], w.shape[1]
    if "weight" not in modifier.produces:
        return _prune_experts(modifier, target, full, out, n_exp, scheme, stats, report)
    spec = scheme.weight
    tr, _ = tile_of(spec.granularity, *full.shape)
    if out % tr:
        raise LowbitError(f"{target.key}: tiles of {tr} rows straddle experts of {out} rows; "
                          "use per-channel or per-group quantization for fused experts")
    gscale = spec.format.global_scale(full)
    parts, idle = [], []
    for e in range(n_exp):
        m = full[e * out:(e + 1) * out]  # (out, in)
        r = modifier.solve_layer(m, stats[e], scheme, f"{target.key}[{e}]", gscale) if e in stats else None
        if r is None:
            parts.append(quantize_matrix(m, spec, gscale))
            idle.append(e)
            continue
        if not r.quantized or r.spec != spec:
            raise LowbitError(f"{target.key}[{e}]: method {modifier.name} returned "
                              f"{'a different spec' if r.quantized else 'no codes'} for one expert of a fused "
                              "tensor, whose experts must share one spec")
        report.layers.append({"key": f"{target.key}[{e}]", "method": modifier.name, **r.info})
        parts.append((r.codes, r.scale, r.zero))
    if idle:
        report.fallbacks.append(f"{target.key}: experts {idle} saw no calibration token, rounded to nearest")
    zero = None if parts[0][2] is None else torch.cat([p[2] for p in parts])
    return LayerResult(spec, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), zero, gscale)


def _prune_experts(modifier: Modifier, target: Target, full: Tensor, out: int, n_exp: int, scheme: TensorScheme,
                   stats: dict[int, Any], report: Any) -> LayerResult | None:
    """A pruning method on fused experts: per expert, its float weight and keep-mask, stacked to
    (E·out, in); experts without tokens stay dense (mask all True). None if no expert changed."""
    weights, masks, idle, changed = [], [], [], 0
    for e in range(n_exp):
        m = full[e * out:(e + 1) * out]  # (out, in)
        r = modifier.solve_layer(m, stats[e], scheme, f"{target.key}[{e}]") if e in stats else None
        if r is not None and r.quantized:
            raise LowbitError(f"{target.key}[{e}]: method {modifier.name} does not produce a weight spec, "
                              "yet it returned codes")
        dense = torch.ones(m.shape, dtype=torch.bool, device=m.device)
        if r is None:
            idle += [] if e in stats else [e]  # an expert the method left alone is not a fallback
            weights.append(m)
            masks.append(dense)
            continue
        report.layers.append({"key": f"{target.key}[{e}]", "method": modifier.name, **r.info})
        changed += 1
        weights.append(r.weight)
        masks.append(dense if r.mask is None else r.mask)
    if idle:
        report.fallbacks.append(f"{target.key}: experts {idle} saw no calibration token, left as they are")
    if not changed:
        return None
    return LayerResult(weight=torch.cat(weights), mask=torch.cat(masks))
