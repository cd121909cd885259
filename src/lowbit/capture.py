"""Find the repeated blocks of a model without tracing.

The blocks are the longest ``nn.ModuleList`` whose children all have one type (a decoder's
``layers``, BERT's ``encoder.layer``, GPT-2's ``h``). Later calibration code catches the first
block's inputs with a hook and walks the blocks in order.
"""
from __future__ import annotations

from torch import nn


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
