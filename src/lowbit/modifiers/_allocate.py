"""Layer-adaptive sparsity for the pruning modifiers: each layer's share of a run's sparsity.

A pruning modifier with ``allocation`` other than "uniform" replaces the sparsity of each of its
(target, scheme) pairs, at planning, by the ratio ``lowbit.algorithms.allocation`` gives that layer:

============  ====================================================================================
allocation    per-layer ratios (the run's ratio is the weighted mean of the pairs' own ratios)
============  ====================================================================================
uniform       every layer keeps its scheme's ratio (nothing changes)
global        one magnitude threshold over every targeted weight (Gupta et al., §16), each layer
              keeping at least ``min_keep`` of its weights (their Minimum Threshold)
erk           Erdős–Rényi-Kernel densities from each layer's shape (Liu et al., §17)
lamp          LAMP scores (Lee et al., ICLR'21): one threshold on each weight's squared magnitude
              over the sum of the squares of the weights not smaller than it in its layer
============  ====================================================================================

Only unstructured sparsity can vary per layer (N:M patterns are fixed): other kinds are refused.
A layer allocated no sparsity is left dense (dropped from the stage; the report lists it).
The weights must be in memory (not streamed from disk): allocation reads every targeted weight.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.qtensor import matrix_view
from lowbit.scheme import SparsitySpec, TensorScheme

ALLOCATIONS = ("uniform", "global", "erk", "lamp")


def check_allocation(name: str, allocation: str, min_keep: float) -> None:
    if allocation not in ALLOCATIONS:
        raise LowbitError(f"{name}: allocation {allocation!r} unknown; use one of {', '.join(ALLOCATIONS)}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 <= min_keep < 1:
        raise LowbitError(f"{name}: min_keep {min_keep!r} must be a fraction of each layer's weights in [0, 1), "
                          "e.g. 0.01")
    if min_keep and allocation != "global":
        raise LowbitError(f"{name}: min_keep applies to allocation=global only (allocation is {allocation!r})")


def allocate_pairs(name: str, allocation: str, min_keep: float, model: nn.Module, pairs: list) -> list:
    """``pairs`` with each unstructured sparsity replaced by its layer's allocated ratio."""
    if allocation == "uniform" or not pairs:
        return pairs
    for t, s in pairs:
        if s.sparsity is None or s.sparsity.kind != "unstructured":
            kind = None if s.sparsity is None else s.sparsity.kind
            raise LowbitError(f"{name}: allocation={allocation} varies the sparsity per layer, which only "
                              f"unstructured sparsity (s=50%) can; {t.key} has {kind} sparsity")
    from lowbit.algorithms import allocation as alloc

    weights = [_matrix(model, t) for t, _ in pairs]
    sizes = [w.numel() for w in weights]
    target = sum(s.sparsity.ratio * n for (_, s), n in zip(pairs, sizes)) / sum(sizes)
    if allocation == "global":
        ratios = alloc.global_magnitude(weights, target, [int(min_keep * n + 0.999999) for n in sizes])
    elif allocation == "erk":
        ratios = alloc.erk([tuple(w.shape) for w in weights], target)
    else:
        ratios = alloc.lamp(weights, target)
    out = []
    for (t, s), r in zip(pairs, ratios):
        if r <= 0:
            continue  # left dense
        if r >= 1:
            raise LowbitError(f"{name}: allocation={allocation} would prune all of {t.key}; lower the sparsity or "
                              "use allocation=global with min_keep (e.g. 0.01)")
        out.append((t, TensorScheme(s.weight, s.input, SparsitySpec("unstructured", ratio=float(r)))))
    return out


def _matrix(model: nn.Module, t) -> torch.Tensor:
    w = getattr(model.get_submodule(t.module_name), t.param)
    if w.device.type == "meta":
        raise LowbitError(f"layer-adaptive allocation reads every targeted weight, but {t.key} is not in memory "
                          "(streamed from disk); use allocation=uniform for a streamed run")
    return matrix_view(w.detach(), t.layout)
