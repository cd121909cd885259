"""Put quantized weights into a model, and find them again.

``attach`` replaces a module's parameter by the ``QuantizedTensor`` that holds its codes plus a
non-persistent buffer of the same name with the dequantized weight, so the module's own forward
runs unchanged (Linear, GPT-2's Conv1D, Conv, Embedding, fused MoE experts alike). Packed
inference kernels are a separate layer (``lowbit.nn``); this is the reference path.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.plan import resolve_targets
from lowbit.qtensor import QuantizedTensor
from lowbit.quantizer import quantize_weight
from lowbit.spec import Rule

_ATTR = "_lowbit_qtensors"


def attach(module: nn.Module, param: str, qt: QuantizedTensor, dtype: torch.dtype) -> None:
    """Swap ``module.<param>`` for ``qt``; the module then computes with ``qt.dequantize(dtype)``."""
    if param in module._parameters:
        del module._parameters[param]
    module.register_buffer(param, qt.dequantize(dtype), persistent=False)
    store = module.__dict__.setdefault(_ATTR, {})
    store[param] = qt


def quantized_tensors(model: nn.Module) -> Iterator[tuple[str, str, QuantizedTensor, torch.dtype]]:
    """(module name, param, qtensor, compute dtype) for every attached quantized weight."""
    for name, module in model.named_modules():
        for param, qt in module.__dict__.get(_ATTR, {}).items():
            yield name, param, qt, getattr(module, param).dtype


def quantize_model(model: nn.Module, plan: list[Rule], progress: bool = True) -> nn.Module:
    """Round-to-nearest every tensor that ``plan`` selects, in place; returns ``model``."""
    pairs = resolve_targets(model, plan)
    modules = dict(model.named_modules())
    for target, spec in tqdm(pairs, desc="quantize (rtn)", unit="tensor", disable=not progress):
        module = modules[target.module_name]
        w = getattr(module, target.param)
        qt = quantize_weight(w, spec, target.layout, name=target.key)
        attach(module, target.param, qt, w.dtype)
    return model
