"""The small public API: ``quantize``, ``save``, ``load``.

    import lowbit
    model = lowbit.quantize(model, "w4g128")      # a preset, a scheme string, a QuantSpec, a scheme or rules
    model = lowbit.quantize(model, "w8a8", method="smoothquant+rtn", calib=windows)
    lowbit.save(model, "out/", tokenizer=tok)
    model = lowbit.load("out/")                     # Hugging Face models rebuild from config.json
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.manifest import record_recipe
from lowbit.models.targets import default_plan
from lowbit.modifiers.base import Modifier
from lowbit.recipe.recipe import Recipe, from_methods
from lowbit.scheme import Rule, TensorScheme
from lowbit.spec import QuantSpec

Plan = str | QuantSpec | TensorScheme | list[Rule]


def make_plan(model: nn.Module, plan: Plan) -> list[Rule]:
    """Rules from a preset or scheme string, a ``QuantSpec`` or ``TensorScheme`` (default plan), or rules."""
    if isinstance(plan, str):
        from lowbit.schemes import parse_tensor_scheme

        plan = parse_tensor_scheme(plan)
    if isinstance(plan, (QuantSpec, TensorScheme)):
        return default_plan(model, plan)
    if isinstance(plan, (list, tuple)) and all(isinstance(r, Rule) for r in plan):
        return list(plan)
    raise LowbitError(f"a plan must be a scheme string, a QuantSpec, a TensorScheme or a list of Rule, "
                      f"not {type(plan).__name__}")


def make_recipe(method: str | Modifier | Recipe, options: dict[str, Any]) -> Recipe:
    """A recipe from ``"a+b"`` plus options, one modifier, or a recipe (then no options)."""
    if isinstance(method, str):
        return from_methods(method, options)
    if options:
        raise LowbitError("options go with a method name (method='gptq', damp=0.1); a modifier or recipe "
                          "object carries its own")
    return Recipe.of(method)


def quantize(model: nn.Module, plan: Plan = "w4g128", method: str | Modifier | Recipe = "rtn", calib: Any = None,
             progress: bool = True, **options: Any) -> nn.Module:
    """Compress ``model`` in place under ``plan`` with ``method``; returns ``model``.

    ``method``: a name from ``lowbit.modifiers.REGISTRY`` ("rtn", "hqq", "nupes", "gptq", ...),
    several joined by ``+`` (one stage each), a modifier object or a ``lowbit.recipe.Recipe``.
    Methods that need data take ``calib``: model inputs as one tensor (N, T) of token windows
    (split into batches of 8, or of the method's own ``batch_windows``) or a list of batches. ``options`` go to the methods that have them,
    e.g. ``damp=0.01``. The run's report is kept as ``model.lowbit_report``.
    """
    from lowbit.engine.dataless import run_data_free
    from lowbit.engine.runner import calibrate
    from lowbit.recipe.plan import plan_recipe

    recipe = make_recipe(method, options)
    rules = make_plan(model, plan)
    if not recipe.needs_data:
        if calib is not None:
            modes = [f"{s.modifier.name} with {s.modifier.needs_data_when}" for s in recipe.stages
                     if getattr(s.modifier, "needs_data_when", None)]
            hint = f", or use {', '.join(modes)}, which takes it" if modes else ""
            raise LowbitError(f"method {recipe.name!r} takes no calibration data; drop calib{hint}")
        report = run_data_free(model, recipe, plan_recipe(model, recipe, rules), progress=progress)
    else:
        if calib is None:
            raise LowbitError(f"method {recipe.name!r} needs calibration data: pass calib=windows, e.g. from "
                              "lowbit.calib.calibration_windows(tokenizer, 'pydoc', 128, 512)")
        batches = list(calib.split(recipe.batch_windows)) if isinstance(calib, torch.Tensor) else list(calib)
        report = calibrate(model, rules, recipe, batches, progress=progress)
    model.__dict__["lowbit_report"] = report
    record_recipe(model, recipe.to_dict(), [r.to_dict() for r in rules])
    return model


def save(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False):
    from lowbit.io import save as _save

    return _save(model, out, tokenizer=tokenizer, overwrite=overwrite)


def load(path: str | os.PathLike, model: nn.Module | None = None, packed: bool = True) -> nn.Module:
    """Load a lowbit folder. Plain PyTorch modules need their skeleton passed as ``model``.

    ``packed=True`` (the default) keeps Linear weights packed in ``lowbit.nn.QuantLinear``
    layers that run on PyTorch's int8/int4 CPU kernels where the format allows (bf16 compute);
    ``packed=False`` gives the float32 fake-quant reference model.
    """
    from lowbit.io import load_into

    if model is not None:
        return load_into(model, path, packed=packed)
    from lowbit.hf.load import load_lowbit

    return load_lowbit(path, packed=packed).model
