"""Put quantized weights into a model, and find them again.

``attach`` replaces a module's parameter by the ``QuantizedTensor`` that holds its codes plus a
non-persistent buffer of the same name with the dequantized weight, so the module's own forward
runs unchanged (Linear, GPT-2's Conv1D, Conv, Embedding, fused MoE experts alike). This is the
reference (fake-quant) path; ``lowbit.nn.pack_model`` swaps Linear layers for packed
``QuantLinear`` layers, and ``lowbit.load`` builds those directly.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from lowbit.qtensor import QuantizedTensor

_ATTR = "_lowbit_qtensors"


def attach(module: nn.Module, param: str, qt: QuantizedTensor, dtype: torch.dtype,
           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Swap ``module.<param>`` for ``qt``; the module then computes with ``qt.dequantize(dtype)``.

    Pass ``weight`` (that dequantized tensor) to share it between tied modules. Returns it.
    """
    if param in module._parameters:
        del module._parameters[param]
    weight = qt.dequantize(dtype) if weight is None else weight
    module.register_buffer(param, weight, persistent=False)
    store = module.__dict__.setdefault(_ATTR, {})
    store[param] = qt
    return weight


def quantized_tensors(model: nn.Module) -> Iterator[tuple[str, str, QuantizedTensor, torch.dtype]]:
    """(module name, param, qtensor, compute dtype) for every quantized weight.

    Packed ``QuantLinear`` layers (``lowbit.nn``) rebuild their QuantizedTensor code for code.
    """
    from lowbit.nn.quant_linear import QuantLinear

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, "weight", module.qtensor(), module.dtype
            continue
        for param, qt in module.__dict__.get(_ATTR, {}).items():
            yield name, param, qt, getattr(module, param).dtype
