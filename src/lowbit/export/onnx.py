"""ONNX export in QDQ form: integer (or fp8) weights feeding ``DequantizeLinear`` (opset 21).

``torch.onnx.export`` (the torch.export-based exporter) writes the model with the dequantized
weights it computes with; each of those float initializers is then found by value (as it is,
or transposed, the exporter's layout for MatMul) and replaced by codes, a float32 scale, an
optional zero point and a ``DequantizeLinear`` whose output keeps the initializer's name:

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
scales are float32 numbers and both compute one subtraction and one product.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export._roles import refuse_extras, refuse_model_extras
from lowbit.export._write import atomic_file
from lowbit.nn.reference import attach, quantized_tensors
from lowbit.version import __version__

SUPPORTED = ("int2-int8 symmetric (stored as ONNX int4/int8), uint2-uint8 with an integer zero point "
             "(uint4/uint8), fp8_e4m3fn and fp8_e5m2; per tensor, per channel, groups gN and tiles bRxC; "
             "no float zeros (uint*_fz), no global scales, no table formats (nf4, mx*, nvfp4, fp4)")
MIN_OPSET = 21  # int4/uint4 and blocked DequantizeLinear (block_size)
_PROTOBUF_LIMIT = 2**31 - 1
_FLOATS = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}  # torch dtype -> TensorProto type


class _ExportFailed(LowbitError):
    """torch.onnx.export itself failed; ``converting``: in the ONNX translation (not in torch.export)."""

    def __init__(self, message: str, converting: bool):
        super().__init__(message)
        self.converting = converting


@dataclass(frozen=True)
class _Entry:
    key: str  # "<module>.<param>"
    qt: Any  # QuantizedTensor
    weight: torch.Tensor  # what the module computes with: qt dequantized to its dtype


def export(path: Path, out: Path, overwrite: bool = False) -> Path:
    """Export the Hugging Face model saved by lowbit at ``path``: ``input_ids -> logits``, float32.

    No KV cache; batch and sequence axes are dynamic where the model allows (else fixed at
    (2, 8), with a warning). A model without logits (a bare encoder) exports its first output.
    """
    from lowbit.hf.load import load_lowbit
    from lowbit.io import read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    refuse_extras(manifest, "onnx")
    if manifest["model"]["kind"] != "hf":
        raise LowbitError(f"{path} holds a plain PyTorch module, which cannot be rebuilt without its code; in "
                          "Python, rebuild it, call lowbit.load(path, model=skeleton), then "
                          "lowbit.export.onnx.export_module(model, example_inputs, out)")
    model = _as_float32(load_lowbit(path, packed=False).model)  # the reference path: modules compute with Ŵ
    wrapper = _InputIds(model).eval()
    ids = torch.arange(16).reshape(2, 8) % int(getattr(model.config, "vocab_size", 2))  # no 0/1 axes
    names = {"input_names": ["input_ids"], "output_names": [wrapper.output_name(ids)]}
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    try:
        return export_module(wrapper, (ids,), out, overwrite, dynamic_shapes=dims, **names)
    except _ExportFailed as e:
        if e.converting:  # an operator ONNX lacks: fixed shapes would not help
            raise
        logging.getLogger(__name__).warning("dynamic batch/sequence axes failed (%s); exporting shape (2, 8)", e)
        return export_module(wrapper, (ids,), out, overwrite, **names)


def export_module(model: nn.Module, example_inputs: tuple, out: Path, overwrite: bool = False,
                  opset: int = MIN_OPSET, *, dynamic_shapes: Any = None, input_names: list[str] | None = None,
                  output_names: list[str] | None = None) -> Path:
    """Export a lowbit-quantized ``model`` (in memory) traced on ``example_inputs`` to ``out``.

    ``dynamic_shapes``, ``input_names`` and ``output_names`` go to ``torch.onnx.export``. Every
    quantized weight must be representable (``SUPPORTED``) and appear unchanged in the exported
    graph. Same model and inputs give the same bytes. Returns ``out``.
    """
    onnx = _onnx()
    if opset < MIN_OPSET:
        raise LowbitError(f"opset {opset} is too old for int4 and blocked DequantizeLinear; use {MIN_OPSET} or newer")
    refuse_model_extras(model.model if isinstance(model, _InputIds) else model, "onnx")
    entries = _entries(model)
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with atomic_file(out, overwrite) as tmp:
        proto = _torch_export(model, example_inputs, opset, dynamic_shapes, input_names, output_names)
        _rewrite(proto, entries)
        _clean_metadata(proto)
        onnx.checker.check_model(proto)
        if proto.ByteSize() > _PROTOBUF_LIMIT:
            raise LowbitError(f"the ONNX model would be {proto.ByteSize() / 2**30:.1f} GiB; a single .onnx file "
                              "holds at most 2 GiB (external data is not supported yet)")
        tmp.write_bytes(proto.SerializeToString())
    return Path(out)


# --- what gets replaced ---------------------------------------------------------------------
def _entries(model: nn.Module) -> list[_Entry]:
    """One entry per distinct QuantizedTensor (tied weights share one); refuses what ONNX cannot hold."""
    from lowbit.schemes import describe

    model = model.model if isinstance(model, _InputIds) else model  # keys as lowbit saved them
    entries, seen = [], set()
    for module_name, param, qt, _ in sorted(quantized_tensors(model), key=lambda r: (r[0], r[1])):
        key = f"{module_name}.{param}" if module_name else param
        if id(qt) in seen:
            continue
        seen.add(id(qt))
        if _element(qt) is None:
            raise LowbitError(f"ONNX export cannot represent {key} quantized as {describe(qt.spec)}; "
                              f"supported: {SUPPORTED}")
        module = model.get_submodule(module_name)
        weight = getattr(module, param, None)
        if not isinstance(weight, torch.Tensor):
            raise LowbitError(f"{key} is held packed by {type(module).__name__}; ONNX export traces the reference "
                              "model: export before lowbit.nn.pack_model, or load with lowbit.load(path, packed=False)")
        if weight.dtype not in _FLOATS:
            raise LowbitError(f"{key} computes in {weight.dtype}; ONNX export needs float32, float16 or bfloat16")
        entries.append(_Entry(key, qt, weight.detach()))
    if not entries:
        raise LowbitError("the model has no quantized weights; quantize it with lowbit.quantize first")
    return entries


def _element(qt) -> str | None:
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


# --- export -----------------------------------------------------------------------------
def _torch_export(model, example_inputs, opset, dynamic_shapes, input_names, output_names):
    with _quiet():
        try:
            program = torch.onnx.export(model, example_inputs, dynamo=True, opset_version=opset, optimize=True,
                                        verbose=False, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                        output_names=output_names)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; report its summary once
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).partition("## Exception summary")
            reason = ((text[2] or text[0]).strip().splitlines() or [type(e).__name__])[0][:300]
            name = type(model.model if isinstance(model, _InputIds) else model).__name__
            raise _ExportFailed(f"torch.onnx.export failed on {name}: {reason}",
                                converting=type(e).__name__ == "ConversionError") from None
    proto = program.model_proto
    version = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if version < MIN_OPSET:
        raise LowbitError(f"torch.onnx.export produced opset {version}; QDQ export needs {MIN_OPSET} or newer")
    return proto


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's notes about optional packages (torchvision) and its deprecations."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        log.setLevel(level)


def _clean_metadata(proto) -> None:
    """Drop the exporter's stack traces and file paths, so the bytes do not depend on the checkout."""
    graph = proto.graph
    for items in (graph.node, graph.initializer, graph.input, graph.output, graph.value_info):
        for item in items:
            del item.metadata_props[:]
    del graph.metadata_props[:]
    del proto.metadata_props[:]
    proto.metadata_props.add(key="lowbit_version", value=__version__)


# --- the QDQ rewrite ----------------------------------------------------------------------
def _rewrite(proto, entries: list[_Entry]) -> None:
    """Replace every initializer equal to a quantized weight (or its transpose) by QDQ nodes."""
    from onnx import numpy_helper

    index: dict[tuple, list[str]] = {}  # (type, dims, sha256 of the bytes) -> initializer names
    for init in proto.graph.initializer:
        if init.data_type in _FLOATS.values():
            data = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
            index.setdefault((init.data_type, tuple(init.dims), hashlib.sha256(data).digest()), []).append(init.name)
    found: dict[str, tuple[_Entry, bool]] = {}  # initializer name -> (entry, holds the transpose)
    for entry in entries:
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
    return _FLOATS[w.dtype], tuple(w.shape), hashlib.sha256(data).digest()


def _qdq(entry: _Entry, transposed: bool, output: str, prefix: str, inits: list, nodes: list) -> None:
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
        nodes.append(helper.make_node("Cast", [y], [output], name=f"{prefix}/Cast", to=_FLOATS[entry.weight.dtype]))


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

    element, fmt = _element(qt), qt.spec.format
    codes = qt.codes().numpy()
    if element.startswith("float8"):  # lowbit's minifloat codes are the OCP bit patterns
        return codes.view(getattr(ml_dtypes, element))
    if fmt.symmetric:
        codes = codes.astype(np.int16) - 2 ** (fmt.bits - 1)
    return codes.astype({"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8}[element])


# --- Hugging Face models ---------------------------------------------------------------------
def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise LowbitError("ONNX export needs onnx and onnxscript; install them with: "
                          "pip install onnx onnxscript onnxruntime") from None
    return onnx


def _as_float32(model: nn.Module) -> nn.Module:
    """Cast ``model`` to float32, its quantized weights dequantized afresh in float32 (exact)."""
    rows = [r for r in quantized_tensors(model) if r[3] != torch.float32]  # float32 ones are exact already
    model.float()
    shared: dict[int, torch.Tensor] = {}
    for module_name, param, qt, _ in rows:
        shared[id(qt)] = attach(model.get_submodule(module_name), param, qt, torch.float32, shared.get(id(qt)))
    return model


class _InputIds(nn.Module):
    """``forward(input_ids)`` -> logits (or the model's first output), without a KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, **self.kwargs)
        return out.logits if getattr(out, "logits", None) is not None else out[0]

    def output_name(self, input_ids: torch.Tensor) -> str:
        """"logits", else the name of the model's first output (one eager forward)."""
        with torch.no_grad():
            out = self.model(input_ids=input_ids, **self.kwargs)
        keys = list(out.keys()) if hasattr(out, "keys") else ["output"]
        return "logits" if "logits" in keys else keys[0]
