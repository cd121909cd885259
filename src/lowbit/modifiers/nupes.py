"""NUPES data-free mode (PowerQuant; Yvinec et al., "PowerQuant: Automorphism Search for
Non-Uniform Quantization", arXiv:2301.09858, and "NUPES: Non-Uniform Post-Training Quantization
via Power Exponent Search", arXiv:2308.05600): per tensor, the power exponent ``a`` that minimizes
``||W − D(Q_a(W))||²`` (``lowbit.algorithms.nupes.search_exponent``), recorded in the spec.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from lowbit.algorithms.nupes import search_exponent
from lowbit.errors import LowbitError
from lowbit.formats.grid import PowerFormat
from lowbit.modifiers.base import LayerResult, Modifier, tensor_scale
from lowbit.quantizer import quantize_matrix
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class NUPES(Modifier):
    """Golden-section search of the power exponent per tensor (no data)."""

    name = "nupes"

    def check_scheme(self, scheme: TensorScheme) -> None:
        fmt = scheme.weight.format
        if not (isinstance(fmt, PowerFormat) or (fmt.family == "int" and fmt.symmetric)):
            raise LowbitError(f"method nupes needs a power or symmetric int format, not {fmt.name}; "
                              "try pow4_a0.5:g64")

    def solve_layer(self, W: Tensor, stats: Any, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 -> codes on ``PowerFormat(bits, a)`` with this tensor's ``a``."""
        self.check_scheme(scheme)
        spec = scheme.weight
        fmt = spec.format
        a = search_exponent(W, fmt.bits, spec.granularity, scale_dtype=spec.scale_dtype)
        spec = replace(spec, format=PowerFormat(fmt.bits, a))
        gscale = tensor_scale(spec, W, global_scale)
        codes, scale, zero = quantize_matrix(W, spec, gscale)
        return LayerResult(spec, codes, scale, zero, gscale, info={"exponent": a})
