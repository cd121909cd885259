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

from lowbit.errors import LowbitError
from lowbit.plan import resolve_targets
from lowbit.qtensor import QuantizedTensor
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


def data_free_methods() -> dict:
    """Name -> ``solve(weight, spec, layout, name) -> QuantizedTensor`` for methods without data."""
    from lowbit.algorithms.nupes import nupes
    from lowbit.algorithms.rtn import rtn

    return {"rtn": rtn, "nupes": nupes}


def quantize_model(model: nn.Module, plan: list[Rule], method: str = "rtn", progress: bool = True) -> nn.Module:
    """Quantize every tensor that ``plan`` selects with a data-free ``method``, in place."""
    methods = data_free_methods()
    if method not in methods:
        raise LowbitError(f"unknown method {method!r}; available: {', '.join(methods)}")
    solve = methods[method]
    pairs = resolve_targets(model, plan)
    modules = dict(model.named_modules())
    for target, spec in tqdm(pairs, desc=f"quantize ({method})", unit="tensor", disable=not progress):
        module = modules[target.module_name]
        w = getattr(module, target.param)
        attach(module, target.param, solve(w, spec, target.layout, target.key), w.dtype)
    return model
