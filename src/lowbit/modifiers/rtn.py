"""Round to nearest: every weight rounded to its spec on its own, with the spec's scale choice."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lowbit.modifiers.base import LayerResult, Modifier, tensor_scale
from lowbit.quantizer import quantize_matrix
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class RTN(Modifier):
    """Round-to-nearest (no data, no options)."""

    name = "rtn"

    def solve_layer(self, W: Tensor, stats: Any, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 -> codes and grids of ``scheme.weight``."""
        spec = scheme.weight
        gscale = tensor_scale(spec, W, global_scale)
        codes, scale, zero = quantize_matrix(W, spec, gscale)
        return LayerResult(spec, codes, scale, zero, gscale)
