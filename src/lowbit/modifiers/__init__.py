"""Compression methods by name: one modifier per file, one line each in ``REGISTRY``.

``REGISTRY`` maps a method name to ``"module:Class"``; a method's module is imported only when
the method is asked for, and an import failure is raised, never swallowed.
"""
from __future__ import annotations

import importlib

from lowbit.errors import LowbitError
from lowbit.modifiers.base import Modifier, build

REGISTRY: dict[str, str] = {
    "rtn": "lowbit.modifiers.rtn:RTN",
    "hqq": "lowbit.modifiers.hqq:HQQ",
    "nupes": "lowbit.modifiers.nupes:NUPES",
    "gptq": "lowbit.modifiers.gptq:GPTQ",
    "wanda": "lowbit.modifiers.wanda:Wanda",
    "sparsegpt": "lowbit.modifiers.sparsegpt:SparseGPT",
    "magnitude": "lowbit.modifiers.magnitude:Magnitude",
    "random": "lowbit.modifiers.random_pruning:RandomPruning",
    "lsq": "lowbit.modifiers.lsq:LSQ",
    "adaround": "lowbit.modifiers.adaround:AdaRound",
    "metaaug": "lowbit.modifiers.metaaug:MetaAug",
    "bias-correction": "lowbit.modifiers.bias_correction:BiasCorrection",
    "smoothquant": "lowbit.modifiers.smoothquant:SmoothQuant",
    "signround": "lowbit.modifiers.signround:SignRound",
    "lorc": "lowbit.modifiers.lorc:LoRC",
}


def available() -> tuple[str, ...]:
    return tuple(REGISTRY)


def modifier_class(name: str) -> type[Modifier]:
    """The modifier class registered as ``name``."""
    if name not in REGISTRY:
        raise LowbitError(f"unknown method {name!r}; available: {', '.join(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make(name: str, **options) -> Modifier:
    """The method ``name`` with ``options`` (its dataclass fields), validated."""
    return build(modifier_class(name), name, options)
