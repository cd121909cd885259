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
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.models.targets import resolve_targets
from lowbit.qtensor import QuantizedTensor
from lowbit.scheme import Rule

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
    _check_all(pairs, modules)  # refuse bad input before any module changes
    owners = _owners(model)
    for target, spec in tqdm(pairs, desc=f"quantize ({method})", unit="tensor", disable=not progress):
        module = modules[target.module_name]
        w = getattr(module, target.param)
        if not isinstance(w, nn.Parameter):
            continue  # a tied twin of a tensor quantized earlier in this loop
        qt = solve(w, spec, target.layout, target.key)
        weight = None
        for owner, pname in owners[id(w)]:  # tied weights (lm_head = embeddings) stay tied
            weight = attach(owner, pname, qt, w.dtype, weight)
    return model


def _check_all(pairs: list, modules: dict[str, nn.Module]) -> None:
    from lowbit.qtensor import matrix_view
    from lowbit.quantizer import check_weight

    for target, spec in pairs:
        if target.quantized:
            raise LowbitError(f"{target.key} is already quantized; quantize the original model instead")
        m = matrix_view(getattr(modules[target.module_name], target.param).detach(), target.layout)
        check_weight(m, spec, *m.shape, name=target.key)


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(parameter) -> every (module, name) that holds it; tied parameters have several."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((module, pname))
    return owners
