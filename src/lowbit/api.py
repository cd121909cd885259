"""The small public API: ``quantize``, ``save``, ``load``.

    import lowbit
    model = lowbit.quantize(model, "w4g128")      # a preset, a spec string, a QuantSpec or a plan
    lowbit.save(model, "out/", tokenizer=tok)
    model = lowbit.load("out/")                     # Hugging Face models rebuild from config.json
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lowbit.apply import quantize_model
from lowbit.errors import LowbitError
from lowbit.plan import default_plan
from lowbit.scheme import Rule
from lowbit.spec import QuantSpec

Plan = str | QuantSpec | list[Rule]


def make_plan(model: nn.Module, plan: Plan) -> list[Rule]:
    """A plan from a preset or spec string, a ``QuantSpec`` (default plan) or a rule list."""
    if isinstance(plan, str):
        from lowbit.schemes import parse_scheme

        plan = parse_scheme(plan)
    if isinstance(plan, QuantSpec):
        return default_plan(model, plan)
    if isinstance(plan, (list, tuple)) and all(isinstance(r, Rule) for r in plan):
        return list(plan)
    raise LowbitError(f"a plan must be a scheme string, a QuantSpec or a list of Rule, not {type(plan).__name__}")


def quantize(model: nn.Module, plan: Plan = "w4g128", method: str = "rtn", calib: Any = None,
             progress: bool = True, **options: Any) -> nn.Module:
    """Quantize ``model`` in place under ``plan`` (default: round-to-nearest); returns ``model``.

    ``method``: "rtn" (round-to-nearest), "nupes" (data-free power-exponent search per tensor), or
    "gptq", which needs ``calib``: model inputs as one tensor (N, T) of token windows (split into
    batches of 8) or a list of batches. ``options`` go to the method, e.g. ``damp=0.01``.
    """
    from lowbit.methods import CALIBRATED, calibrated

    rules = make_plan(model, plan)
    if method not in CALIBRATED:
        if calib is not None or options:
            raise LowbitError(f"method {method!r} takes no calibration data or options")
        return quantize_model(model, rules, method=method, progress=progress)
    if calib is None:
        raise LowbitError(f"method {method!r} needs calibration data: pass calib=windows, e.g. from "
                          "lowbit.calib.calibration_windows(tokenizer, 'pydoc', 128, 512)")
    from lowbit.run import calibrate

    batches = list(calib.split(8)) if isinstance(calib, torch.Tensor) else list(calib)
    calibrate(model, rules, calibrated(method, **options), batches, progress=progress)
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
