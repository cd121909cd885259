"""Sparse weights in export targets without a sparse format: densified, zeros stored as values.

No export target of lowbit stores a keep-mask in a format its readers understand today:

* GGUF and ONNX have no sparse weight format at all;
* compressed-tensors dropped its ``sparse-bitmask`` and ``sparse-24-bitmask`` compressors in
  0.15.0 ("remove sparsity", vllm-project/compressed-tensors#610): 0.20.x still parses the
  config classes but has no compressor to decompress them, transformers 5 requires
  compressed-tensors >= 0.15, and vLLM 0.19.1+ raises ``NotImplementedError`` for Sparse24
  models (vllm-project/vllm#36799). A folder in those formats would load nowhere current.

So every export *densifies*: a pruned weight is written as an ordinary stored value that is
exactly +0.0, and ``warn_dense`` logs a warning that the file has no sparse format. The weights
read back are exactly lowbit's masked reconstruction; only the size saving of sparsity is lost.

=========================  ==================================================================
pruned weight              written as
=========================  ==================================================================
float (pruned in place)    as it is: it already holds +0.0 wherever the mask is False
quantized + masked         each pruned code becomes its block's zero code (``fold_mask``): the
                           code the format rounds 0.0 to, when it dequantizes to exactly +0.0
                           (symmetric int: the middle code; integer zero point ``z``: ``z``;
                           minifloats, NF4: their +0 entry). A block without one (a float zero
                           point ``m``: ``s·c + m`` is 0 for almost no ``c``) is refused.
=========================  ==================================================================
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.grouping import from_blocks, regions, to_blocks
from lowbit.packing import pack
from lowbit.qtensor import QuantizedTensor, matrix_view

log = logging.getLogger(__name__)

#: why each target has no sparse format (the warnings and errors quote it)
NO_SPARSE_FORMAT = {
    "gguf": "GGUF has no sparse tensor type",
    "onnx": "ONNX QDQ has no sparse weight format",
    "compressed-tensors": ("compressed-tensors 0.15+ has no sparse compressor (sparse-bitmask and "
                           "sparse-24-bitmask were removed; vLLM 0.19.1+ refuses Sparse24 models)"),
}


def zero_codes(qt: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """Per weight of the matrix view: the code of 0.0 in its block and whether it is exact.

    Returns ``codes`` (rows, cols) uint8, the format's own rounding of 0.0 with each block's
    qparams, and ``exact`` (rows, cols) bool, True where that code dequantizes to exactly +0.0.
    """
    fmt, shape = qt.spec.format, qt.matrix_shape
    codes = torch.empty(shape, dtype=torch.uint8)
    exact = torch.empty(shape, dtype=torch.bool)
    for region in regions(shape, qt.tile):
        qp = qt.qparams(region)
        n, width = qp.scale.shape[0], region.tile[0] * region.tile[1]
        zc = fmt.quantize(torch.zeros(n, 1), qp)  # (n_blocks, 1)
        zv = fmt.dequantize(zc, qp)
        ok = (zv == 0) & ~torch.signbit(zv)  # +0.0, as the mask's own masked_fill gives
        from_blocks(zc.expand(n, width), region, codes)
        from_blocks(ok.expand(n, width), region, exact)
    return codes, exact


def fold_mask(qt: QuantizedTensor, key: str, target: str) -> QuantizedTensor:
    """``qt`` without its mask, each pruned code replaced by its block's exact zero code.

    The result dequantizes to ``qt.dequantize()`` exactly (kept codes are untouched). A tensor
    without a mask comes back as it is; one with a pruned weight in a block whose format has
    no exact zero raises ``LowbitError``.
    """
    if qt.mask is None:
        return qt
    pruned = ~matrix_view(qt.mask, qt.layout)  # (rows, cols) bool
    zc, exact = zero_codes(qt)
    bad = int((pruned & ~exact).sum())
    if bad:
        from lowbit.schemes import describe

        raise LowbitError(
            f"{target} cannot store the pruned weights of {key}: {NO_SPARSE_FORMAT[target]}, so lowbit writes "
            f"pruned weights as stored zeros, but {describe(qt.spec)} has no code that is exactly 0 for {bad} of "
            "them (a float zero point m gives s·c + m, zero for almost no code); quantize with a symmetric or "
            "integer-zero format (int4, int8, uint4, fp8_e4m3fn) or keep the lowbit folder")
    codes = torch.where(pruned, zc, qt.codes())
    return replace(qt, packed=pack(codes.reshape(-1), qt.spec.format.bits), mask=None)


def warn_dense(target: str, keys: list[str]) -> None:
    """One warning per export naming how many pruned weights were written dense, and why."""
    if keys:
        log.warning("%s: %s; %d pruned weight%s (%s%s) written dense, pruned values stored as exact zeros (the "
                    "file is no smaller for its sparsity; the lowbit folder keeps the masks)", target,
                    NO_SPARSE_FORMAT[target], len(keys), "s" if len(keys) > 1 else "", ", ".join(sorted(keys)[:3]),
                    ", ..." if len(keys) > 3 else "")
