"""Quantize a model's weights with a data-free method.

``attach`` and ``quantized_tensors`` live in ``lowbit.nn.reference`` (re-exported here for the
callers that import them from this module).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.nn.reference import _QTENSORS as _ATTR  # noqa: F401 - for stream.py until it calls reference.forget
from lowbit.nn.reference import attach, quantized_tensors  # noqa: F401 - re-exported
from lowbit.plan import resolve_targets
from lowbit.qtensor import QuantizedTensor
from lowbit.scheme import Rule

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
