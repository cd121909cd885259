"""ONNX export in QDQ form: integer (or fp8) weights feeding ``DequantizeLinear`` (opset 21).

``torch.onnx.export`` (the torch.export-based exporter) writes the model with the dequantized
weights it computes with; ``lowbit.export._onnx_qdq`` then replaces each of those float
initializers by integer (or fp8) codes feeding a ``DequantizeLinear`` (its module docstring has
the table of what each lowbit spec becomes), exact bit for bit.
"""
from __future__ import annotations

import inspect
import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export._onnx_qdq import SUPPORTED, entries, rewrite
from lowbit.export._roles import refuse_extras, refuse_model_extras
from lowbit.export._sparse import warn_dense
from lowbit.export._write import atomic_file
from lowbit.nn.reference import attach, masks, quantized_tensors
from lowbit.version import __version__

MIN_OPSET = 21  # int4/uint4 and blocked DequantizeLinear (block_size)
_PROTOBUF_LIMIT = 2**31 - 1


class _ExportFailed(LowbitError):
    """torch.onnx.export itself failed; ``converting``: in the ONNX translation (not in torch.export)."""

    def __init__(self, message: str, converting: bool):
        super().__init__(message)
        self.converting = converting


def export(path: Path, out: Path, overwrite: bool = False) -> Path:
    """Export the Hugging Face model saved by lowbit at ``path``: ``input_ids -> logits``, float32.

    No KV cache; batch and sequence axes are dynamic where the model allows (else fixed at
    (2, 8), with a warning). A model without logits (a bare encoder) exports its first output.
    """
    from lowbit.hf.load import load_lowbit
    from lowbit.io import read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    refuse_extras(manifest, "onnx", allow=("mask", "added_bias"))
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
    inner = model.model if isinstance(model, _InputIds) else model  # keys as lowbit saved them
    refuse_model_extras(inner, "onnx", allow=("mask",))
    found = entries(inner)
    warn_dense("onnx", _pruned_keys(inner))
    example_inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with atomic_file(out, overwrite) as tmp:
        proto = _torch_export(model, example_inputs, opset, dynamic_shapes, input_names, output_names)
        rewrite(proto, found)
        _clean_metadata(proto)
        onnx.checker.check_model(proto)
        if proto.ByteSize() > _PROTOBUF_LIMIT:
            raise LowbitError(f"the ONNX model would be {proto.ByteSize() / 2**30:.1f} GiB; a single .onnx file "
                              "holds at most 2 GiB (external data is not supported yet)")
        tmp.write_bytes(proto.SerializeToString())
    return Path(out)


def _pruned_keys(model: nn.Module) -> list[str]:
    """Keys of every pruned weight: float ones with a recorded mask, quantized ones with a mask role."""
    keys = [f"{n}.{p}" for n, p, _ in masks(model)]
    return sorted({*keys, *(f"{n}.{p}" for n, p, qt, _ in quantized_tensors(model) if qt.mask is not None)})


# --- the exporter ----------------------------------------------------------------------------
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


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise LowbitError("ONNX export needs onnx and onnxscript; install them with: "
                          "pip install onnx onnxscript onnxruntime") from None
    return onnx


# --- Hugging Face models ---------------------------------------------------------------------
def _as_float32(model: nn.Module) -> nn.Module:
    """Cast ``model`` to float32, its quantized weights dequantized afresh in float32 (exact)."""
    rows = [r for r in quantized_tensors(model) if r[3] != torch.float32]  # float32 ones are exact already
    nn.Module.float(model)  # transformers' own .float() refuses a model its quantizer loaded (is_quantized)
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
