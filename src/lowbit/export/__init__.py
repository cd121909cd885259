"""Exports to the runtimes people deploy on, each verified by the target's own reader.

``export(path, to, out)`` reads a folder saved by lowbit and writes ``out`` atomically:

==================== ============================================= ===========================
target               module                                        checked with
==================== ============================================= ===========================
compressed-tensors   ``lowbit.export.compressed_tensors`` (vLLM)   the compressed-tensors package
gguf                 ``lowbit.export.gguf`` (llama.cpp)            the gguf package, llama.cpp
onnx                 ``lowbit.export.onnx`` (QDQ)                  onnxruntime
==================== ============================================= ===========================

Each target module exposes ``export(path: Path, out: Path, overwrite: bool = False) -> Path`` and
``SUPPORTED``, a one-line description of the schemes it can represent; a scheme it cannot
represent raises ``LowbitError`` that quotes it.

Sparse models (float pruned, or quantized with a ``mask``) are densified with a warning: no
target has a sparse format its current readers load, so pruned weights are written as exact
zeros, and a masked weight whose format has no exact zero code is refused (``lowbit.export._sparse``).
For compressed-tensors, ``sparse_format="sparse-bitmask"`` or ``"sparse-24-bitmask"`` writes a
float pruned model in its (pre-0.15) sparse formats instead (``lowbit.export._ct_sparse``).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from lowbit.errors import LowbitError

#: target name -> the module that writes it (imported when asked for)
TARGETS = {"compressed-tensors": "lowbit.export.compressed_tensors", "gguf": "lowbit.export.gguf",
           "onnx": "lowbit.export.onnx"}


def target_module(to: str):
    if to not in TARGETS:
        raise LowbitError(f"unknown export target {to!r}; use one of: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[to])


def export(path: str | os.PathLike, to: str, out: str | os.PathLike, overwrite: bool = False,
           sparse_format: str = "dense") -> Path:
    """Export the lowbit folder ``path`` to ``to`` (a key of ``TARGETS``) at ``out``; returns ``out``.

    sparse_format: "dense" (every target), or "sparse-bitmask" / "sparse-24-bitmask" (compressed-tensors).
    """
    module = target_module(to)
    path = Path(path)
    from lowbit.io import read_manifest

    read_manifest(path)  # a clear error for a folder that is not lowbit's
    if sparse_format != "dense":
        if to != "compressed-tensors":
            raise LowbitError(f"sparse format {sparse_format!r} is compressed-tensors'; {to} exports are dense "
                              "(pruned weights stored as zeros)")
        return module.export(path, Path(out), overwrite=overwrite, sparse_format=sparse_format)
    return module.export(path, Path(out), overwrite=overwrite)
