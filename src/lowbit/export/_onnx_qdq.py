"""The QDQ rewrite of an exported ONNX graph: every float initializer that equals a quantized
weight (as it is, or transposed, the exporter's layout for MatMul) becomes codes, a float32
scale, an optional zero point and a ``DequantizeLinear`` whose output keeps the initializer's name:

=================  ========================  ==============================================
lowbit             ONNX codes                DequantizeLinear
=================  ========================  ==============================================
int2 .. int4       int4 (q = code - 2^(b-1))  no zero point
int5 .. int8       int8                      no zero point
uint2 .. uint4     uint4                     uint4 zero point (integer zeros only)
uint5 .. uint8     uint8                     uint8 zero point
fp8_e4m3fn, e5m2   float8e4m3fn, float8e5m2  no zero point
tensor                                       scalar scale
channel                                      scale (rows,), ``axis`` = output dimension
gN, bRxC                                     ``axis`` = input dimension, ``block_size`` = N
=================  ========================  ==============================================

A partial last group is allowed; a bRxC tile's scale is repeated on each of its rows. A conv
weight grouped along its flattened ``in·kh·kw`` columns is dequantized as a matrix and
reshaped; a weight the model computes with in float16 / bfloat16 gets a ``Cast``.
``(q - zero) * scale`` in float32 equals ``QuantizedTensor.dequantize()`` bit for bit: lowbit's
scales are float32 numbers and both compute one subtraction and one product. A masked weight
is written densified (pruned codes = the exact zero code: ``q = 0``, or ``q = zero``), since ONNX
has no sparse weight format; float pruned weights stay float initializers holding their zeros.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.reference import quantized_tensors

SUPPORTED = ("int2-int8 symmetric (stored as ONNX int4/int8), uint2-uint8 with an integer zero point "
             "(uint4/uint8), fp8_e4m3fn and fp8_e5m2; per tensor, per channel, groups gN and tiles bRxC; "
             "no float zeros (uint*_fz), no global scales, no table formats (nf4, mx*, nvfp4, fp4)")
FLOATS = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # torch dtype -> TensorProto type


@dataclass(frozen=True)
class Entry:
    """One quantized weight to find in the graph."""

    key: str  # "<module>.<param>"
    qt: Any  # QuantizedTensor
    weight: torch.Tensor  # what the module computes with: qt dequantized to its dtype


def entries(model: nn.Module) -> list[Entry]:
    """One entry per distinct QuantizedTensor (tied weights share one); refuses what ONNX cannot hold.

    A masked weight's entry holds it densified (``lowbit.export._sparse.fold_mask``): pruned codes
    set to the exact zero code, so that its DequantizeLinear gives the masked weight exactly.
    """
    from lowbit.export._sparse import fold_mask
    from lowbit.nn.reference import masks
    from lowbit.schemes import describe

    out, seen = [], set()
    for module_name, param, qt, _ in sorted(quantized_tensors(model), key=lambda r: (r[0], r[1])):
        key = f"{module_name}.{param}" if module_name else param
        if id(qt) in seen:
            continue
        seen.add(id(qt))
        if element(qt) is None:
            raise LowbitError(f"ONNX export cannot represent {key} quantized as {describe(qt.spec)}; "
                              f"supported: {SUPPORTED}")
        qt = fold_mask(qt, key, "onnx")
        module = model.get_submodule(module_name)
        weight = getattr(module, param, None)
        if not isinstance(weight, torch.Tensor):
            raise LowbitError(f"{key} is held packed by {type(module).__name__}; ONNX export traces the reference "
                              "model: export before lowbit.nn.pack_model, or load with lowbit.load(path, packed=False)")
        if weight.dtype not in FLOATS:
            raise LowbitError(f"{key} computes in {weight.dtype}; ONNX export needs float32, float16 or bfloat16")
        out.append(Entry(key, qt, weight.detach()))
    if not out and next(masks(model), None) is None:  # a float pruned model exports as float, zeros in place
        raise LowbitError("the model has no quantized or pruned weights; quantize it with lowbit.quantize first")
    return out


def element(qt) -> str | None:
    """The ml_dtypes / numpy name of the ONNX code type for ``qt``, or None where ONNX has none."""
    from lowbit.formats.float import FloatFormat
    from lowbit.formats.int import IntFormat

    fmt = qt.spec.format
    if qt.global_scale is not None or fmt.scale_storage is not None:
        return None
    if type(fmt) is IntFormat and (fmt.symmetric or fmt.zero == "int"):
        return ("int" if fmt.symmetric else "uint") + ("4" if fmt.bits <= 4 else "8")
    if type(fmt) is FloatFormat:
        return {(4, 3, 7, "fn"): "float8_e4m3fn", (5, 2, 15, "ieee"): "float8_e5m2"}.get(
            (fmt.exp, fmt.man, fmt.bias, fmt.special))
    return None


def rewrite(proto, weights: list[Entry]) -> None:
    """Replace every initializer equal to a quantized weight (or its transpose) by QDQ nodes."""
    from onnx import numpy_helper

    index: dict[tuple, list[str]] = {}  # (type, dims, sha256 of the bytes) -> initializer names
    for init in proto.graph.initializer:
        if init.data_type in FLOATS.values():
            data = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
            index.setdefault((init.data_type, tuple(init.dims), hashlib.sha256(data).digest()), []).append(init.name)
    found: dict[str, tuple[Entry, bool]] = {}  # initializer name -> (entry, holds the transpose)
    for entry in weights:
        w = entry.weight
        views = [(False, w), (True, w.t())] if w.dim() == 2 else [(False, w)]
        hits = [(name, t) for t, v in views for name in index.get(_fingerprint(v), [])]
        if not hits:
            raise LowbitError(f"{entry.key} is not a constant of the exported graph (unused by forward, or "
                              "folded into another constant by the exporter); it cannot be exported as QDQ")
        for name, t in hits:
            found.setdefault(name, (entry, t))
    nodes, inits, counts = [], [], {}
    for init in proto.graph.initializer:  # graph order: deterministic
        if init.name in found:
            entry, t = found[init.name]
            n = counts[entry.key] = counts.get(entry.key, -1) + 1
            _qdq(entry, t, init.name, f"{entry.key}_{n}" if n else entry.key, inits, nodes)
    kept = [i for i in proto.graph.initializer if i.name not in found]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + inits)
    body = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes + body)  # initializers only feed them: topological order holds


def _fingerprint(w: torch.Tensor) -> tuple:
    data = w.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return FLOATS[w.dtype], tuple(w.shape), hashlib.sha256(data).digest()


def _qdq(entry: Entry, transposed: bool, output: str, prefix: str, inits: list, nodes: list) -> None:
    """Append the initializers and nodes that compute ``output`` (the weight, or its transpose)."""
    from onnx import helper, numpy_helper

    qt, shape = entry.qt, tuple(entry.weight.t().shape if transposed else entry.weight.shape)
    flip = (qt.layout == "transposed") != transposed  # the graph holds the matrix view transposed
    codes, scale, zero, attrs = _qparams(qt, flip, shape)
    names = [f"{prefix}_quantized", f"{prefix}_scale"] + ([f"{prefix}_zero_point"] if zero is not None else [])
    inits += [numpy_helper.from_array(np.ascontiguousarray(a), n) for a, n in zip((codes, scale, zero), names)]
    reshape, cast = codes.shape != shape, entry.weight.dtype != torch.float32
    y = f"{prefix}_dequantized" if reshape or cast else output
    nodes.append(helper.make_node("DequantizeLinear", names, [y], name=f"{prefix}/DequantizeLinear", **attrs))
    if reshape:
        inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{prefix}_shape"))
        x, y = y, (f"{prefix}_reshaped" if cast else output)
        nodes.append(helper.make_node("Reshape", [x, f"{prefix}_shape"], [y], name=f"{prefix}/Reshape"))
    if cast:
        nodes.append(helper.make_node("Cast", [y], [output], name=f"{prefix}/Cast", to=FLOATS[entry.weight.dtype]))


def _qparams(qt, flip: bool, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """(codes, scale, zero, DequantizeLinear attributes) for a graph tensor of ``shape``.

    From the (rows, cols) matrix view, transposed when ``flip``. Codes come out in ``shape``
    where DequantizeLinear can express the grouping on it, else as the matrix (to be reshaped).
    """
    rows, cols = qt.matrix_shape
    tr, tc = qt.tile
    codes = _codes(qt)  # (rows, cols)
    scale = _per_row(qt.scale, tr, rows)  # (rows, groups per row), or (1, 1)
    zero = None if qt.zero is None else _per_row(qt.zero, tr, rows).astype(codes.dtype)
    if scale.shape == (1, 1):  # one scale (and zero) for the whole tensor
        codes = codes.T if flip else codes.reshape(shape)
        return codes, scale.reshape(()), None if zero is None else zero.reshape(()), {}
    row_axis = 1 if flip else 0
    if scale.shape[1] == 1:  # one scale per output row
        if flip:
            codes = codes.T
        elif len(shape) > 2 and qt.layout == "rows":
            codes = codes.reshape(shape)  # conv (out, in, kh, kw): per channel along axis 0
        return codes, scale[:, 0], None if zero is None else zero[:, 0], {"axis": row_axis}
    if flip:
        codes, scale, zero = codes.T, scale.T, None if zero is None else zero.T
    return codes, scale, zero, {"axis": 1 - row_axis, "block_size": min(tc, cols)}


def _per_row(grid: torch.Tensor, tile_rows: int, rows: int) -> np.ndarray:
    """(grid_rows, grid_cols) -> (rows, grid_cols) float32: a tile's value repeated on each of its rows."""
    if tile_rows > 1 and grid.shape != (1, 1):
        grid = grid.repeat_interleave(tile_rows, dim=0)[:rows]
    return grid.to(torch.float32).numpy()


def _codes(qt) -> np.ndarray:
    """(rows, cols) codes in the ONNX element type (see the module table)."""
    import ml_dtypes

    kind, fmt = element(qt), qt.spec.format
    codes = qt.codes().numpy()
    if kind.startswith("float8"):  # lowbit's minifloat codes are the OCP bit patterns
        return codes.view(getattr(ml_dtypes, kind))
    if fmt.symmetric:
        codes = codes.astype(np.int16) - 2 ** (fmt.bits - 1)
    return codes.astype({"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8}[kind])
