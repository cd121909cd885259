"""The repeated blocks of a model, found by structure (no tracing).

The blocks are the longest ``nn.ModuleList`` whose children all have one type (a decoder's
``layers``, BERT's ``encoder.layer``, GPT-2's ``h``).
"""
from __future__ import annotations

from torch import nn

from lowbit.errors import LowbitError


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, module list) of the repeated blocks, or None when there are none.

    Ties go to the first list in ``named_modules`` order; lists of length 1 do not count.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def check_uniform_layers(model: nn.Module) -> None:
    """Refuse models whose blocks need different extra arguments (sliding and full attention mixed)."""
    config = getattr(model, "config", None)
    types = set(getattr(config, "layer_types", None) or [])
    if len(types) > 1:
        raise LowbitError(f"this model mixes layer types {sorted(types)}, whose blocks receive different attention "
                          "masks; the calibration runner does not support that yet, use --method rtn")
