"""compressed-tensors' sparse formats for float pruned weights: ``sparse-bitmask`` and
``sparse-24-bitmask``.

These are the formats of compressed-tensors up to 0.14 (llm-compressor's sparse checkpoints); 0.15
removed their compressors and vLLM 0.19.1+ refuses Sparse24 models, so ``lowbit export`` writes
them only when asked (``sparse_format=``) and densifies by default (``lowbit.export._sparse``).
Layout per pruned weight ``W`` (rows, cols) of module ``m`` with keep-mask ``K``:

=====================  ==================================================================
format                 tensors
=====================  ==================================================================
sparse-bitmask         ``m.shape`` int64 (2,); ``m.compressed`` (nnz,) the kept values in
                       row-major order; ``m.bitmask`` uint8 (rows, ⌈cols/8⌉), ``K`` packed
                       along each row, least significant bit first; ``m.row_offsets``
                       int64 (rows,), the index in ``compressed`` where each row starts
sparse-24-bitmask      ``m.shape`` int64 (2, 1); ``m.compressed`` (rows, cols/2) the two
                       kept values of every run of 4; ``m.bitmask`` as above
=====================  ==================================================================

The bitmask is lowbit's own keep-mask, so a kept weight that happens to be 0.0 stays kept (the
readers scatter the values through the mask: the dense weight comes back bit for bit). Values keep
the folder's dtype.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lowbit.errors import LowbitError

FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
STRUCTURE = {"sparse-bitmask": "unstructured", "sparse-24-bitmask": "2:4"}


def check_format(sparse_format: str) -> None:
    if sparse_format not in FORMATS:
        raise LowbitError(f"sparse format {sparse_format!r} unknown; use one of {', '.join(FORMATS)}")


def pack_rows(keep: Tensor) -> Tensor:
    """keep (rows, cols) bool -> (rows, ⌈cols/8⌉) uint8, bits little-endian within each byte."""
    return torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))


def compress(module: str, weight: Tensor, keep: Tensor, sparse_format: str) -> dict[str, Tensor]:
    """The tensors of one pruned weight (rows, cols) with keep-mask (rows, cols) bool, named
    ``{module}.{shape,compressed,bitmask[,row_offsets]}``."""
    if weight.ndim != 2 or keep.shape != weight.shape:
        raise LowbitError(f"{module}: {sparse_format} stores 2-D weights with a mask of the same shape, got "
                          f"{tuple(weight.shape)} and {tuple(keep.shape)}; use sparse_format='dense'")
    rows, cols = weight.shape
    out = {f"{module}.bitmask": pack_rows(keep), f"{module}.compressed": weight[keep].contiguous()}
    if sparse_format == "sparse-bitmask":
        counts = keep.sum(1)
        out[f"{module}.shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        out[f"{module}.row_offsets"] = (torch.cumsum(counts, 0) - counts).to(torch.int64)
        return out
    runs = keep.reshape(rows, -1, 4).sum(-1) if cols % 4 == 0 else None
    if runs is None or not bool((runs == 2).all()):
        raise LowbitError(f"{module} is not 2:4 sparse (two kept weights in every run of 4 inputs), which "
                          "sparse-24-bitmask stores; prune with --pattern 2:4 or export with sparse-bitmask")
    out[f"{module}.compressed"] = out[f"{module}.compressed"].reshape(rows, cols // 2)
    out[f"{module}.shape"] = torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)
    return out


def sparsity_config(sparse_format: str, modules: list[str], sparsity: float) -> dict[str, Any]:
    """The ``sparsity_config`` entry of the ``quantization_config``."""
    return {"format": sparse_format, "targets": sorted(modules), "ignore": [], "global_sparsity": sparsity,
            "sparsity_structure": STRUCTURE[sparse_format], "registry_requires_subclass": False}
