"""Swap a quantized model's Linear layers for packed ``QuantLinear`` layers.

``lowbit.load`` does this by default; ``pack_model`` does it for a model quantized in memory.
A weight shared by several modules (tied embeddings and lm_head) stays on the reference path
(``lowbit.nn.reference.attach``), so ties keep holding.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.quant_linear import QuantLinear
from lowbit.nn.reference import attach, qtensors
from lowbit.qtensor import QuantizedTensor


def packable(module: nn.Module, qt: QuantizedTensor) -> bool:
    """Linear (layout rows) or GPT-2 Conv1D (layout transposed) with a 2-D weight."""
    if len(qt.shape) != 2:
        return False
    if isinstance(module, nn.Linear):
        return qt.layout == "rows"
    return type(module).__name__ == "Conv1D" and qt.layout == "transposed"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def pack_model(model: nn.Module, kernels: tuple[str, ...] = ("int8", "int4", "dequant")) -> nn.Module:
    """Replace every packable quantized layer by a ``QuantLinear``, in place; returns ``model``."""
    uses: dict[int, int] = {}
    found = []
    for name, module in model.named_modules():
        qt = qtensors(module).get("weight")
        if qt is not None:
            uses[id(qt)] = uses.get(id(qt), 0) + 1
            found.append((name, module, qt))
    for name, module, qt in found:
        if uses[id(qt)] > 1 or not packable(module, qt) or not name:
            continue
        dtype = module.weight.dtype
        replace_module(model, name, QuantLinear(qt, module.bias, dtype, kernels))
    return model


def place(model: nn.Module, name: str, param: str, qt: QuantizedTensor, dtype: torch.dtype,
          packed: bool = True) -> torch.Tensor | None:
    """Put ``qt``, the quantized ``param`` of module ``name``, into ``model`` (loading).

    With ``packed``, a packable Linear/Conv1D weight becomes a ``QuantLinear`` in place of its
    module (returns None); anything else takes the reference path, ``lowbit.nn.reference.attach``
    (returns the dequantized weight). Weights shared with another module must not come here.
    """
    module = model.get_submodule(name)
    if packed and param == "weight" and name and packable(module, qt):
        replace_module(model, name, QuantLinear(qt, module.bias, dtype))
        return None
    return attach(module, param, qt, dtype)


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many layers run on each kernel, e.g. {"int4": 210}."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out[m.kernel.NAME] = out.get(m.kernel.NAME, 0) + 1
    return out
