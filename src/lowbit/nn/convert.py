"""Swap a quantized model's Linear layers for packed ``QuantLinear`` layers.

``lowbit.load`` does this by default; ``pack_model`` does it for a model quantized in memory.
A weight shared by several modules (tied embeddings and lm_head) stays on the reference path
(``lowbit.apply.attach``), so ties keep holding.
"""
from __future__ import annotations

from torch import nn

from lowbit.nn.quant_linear import QuantLinear
from lowbit.qtensor import QuantizedTensor

_ATTR = "_lowbit_qtensors"


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
        qt = module.__dict__.get(_ATTR, {}).get("weight")
        if qt is not None:
            uses[id(qt)] = uses.get(id(qt), 0) + 1
            found.append((name, module, qt))
    for name, module, qt in found:
        if uses[id(qt)] > 1 or not packable(module, qt) or not name:
            continue
        dtype = module.weight.dtype
        replace_module(model, name, QuantLinear(qt, module.bias, dtype, kernels))
    return model


def packed_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many layers run on each kernel, e.g. {"int4": 210}."""
    out: dict[str, int] = {}
    for _, m in packed_layers(model):
        out[m.kernel.NAME] = out.get(m.kernel.NAME, 0) + 1
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (packed layers count their packed form)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if t.device.type != "meta" else 0
    return total



