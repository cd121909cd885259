"""Round-to-nearest: every weight rounded to its spec on its own, no data."""
from __future__ import annotations

from torch import Tensor

from lowbit.qtensor import QuantizedTensor
from lowbit.quantizer import quantize_weight
from lowbit.spec import QuantSpec


def rtn(weight: Tensor, spec: QuantSpec, layout: str = "rows", name: str = "weight") -> QuantizedTensor:
    """Quantize ``weight`` (any shape, float) to ``spec`` with the spec's scale choice."""
    return quantize_weight(weight, spec, layout, name)
