"""HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Models",
https://mobiusml.github.io/hqq_blog/): data-free, the min-max scale with the float zero refined
by half-quadratic steps. The solver is the spec's ``hqq`` scale search (``lowbit.quantizer``);
this method applies it to every targeted weight, whatever scale search the scheme names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.modifiers.base import LayerResult, Modifier, tensor_scale
from lowbit.quantizer import quantize_matrix
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class HQQ(Modifier):
    """HQQ's zero optimizer on float-zero formats (``uint4_fz``, ``uint3_fz``, ...)."""

    name = "hqq"

    def check_scheme(self, scheme: TensorScheme) -> None:
        if scheme.weight.format.zero_kind != "float":
            raise LowbitError(f"method hqq refines a float zero; {scheme.weight.format.name} has none, use a "
                              "float-zero format such as uint4_fz:g64")

    def solve_layer(self, W: Tensor, stats: Any, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 -> codes and grids with HQQ's refined float zeros."""
        self.check_scheme(scheme)
        spec = replace(scheme.weight, scale_search="hqq")
        gscale = tensor_scale(spec, W, global_scale)
        codes, scale, zero = quantize_matrix(W, spec, gscale)
        return LayerResult(spec, codes, scale, zero, gscale)
