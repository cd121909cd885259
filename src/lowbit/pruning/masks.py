"""Keep-masks from per-layer sparsities (the output of ``lowbit.algorithms.allocation``).

``magnitude_masks`` keeps the largest |w| of each layer (ties: the lower flat index is pruned first,
the order the allocations count with); ``random_masks`` keeps a uniformly random subset of the same
size (§17's random pruning at initialization). Every layer prunes exactly ``round(s_l · n_l)``
weights. Masks are bool tensors of the weight's shape, True where a weight is kept, as
``lowbit.pruning.small.apply_masks`` and ``train`` take them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lowbit.algorithms.allocation import keep_largest
from lowbit.errors import LowbitError


def _pruned(weights: Mapping[str, Tensor], sparsities: Sequence[float]) -> list[int]:
    if len(sparsities) != len(weights):
        raise LowbitError(f"{len(sparsities)} sparsities for {len(weights)} layers; pass one per layer, in order")
    bad = [s for s in sparsities if not 0.0 <= float(s) <= 1.0]
    if bad:
        raise LowbitError(f"layer sparsity {bad[0]!r} is outside [0, 1]")
    return [round(float(s) * w.numel()) for s, w in zip(sparsities, weights.values())]


def magnitude_masks(weights: Mapping[str, Tensor], sparsities: Sequence[float]) -> dict[str, Tensor]:
    """name -> keep-mask of the largest-|w| weights; weights: name -> tensor (e.g. ``small.prunable``)."""
    pruned = _pruned(weights, sparsities)
    return {name: keep_largest(w.detach().abs(), w.numel() - p) for (name, w), p in zip(weights.items(), pruned)}


def random_masks(weights: Mapping[str, Tensor], sparsities: Sequence[float], seed: int = 0) -> dict[str, Tensor]:
    """name -> keep-mask with a uniformly random ``n_l − round(s_l·n_l)`` kept; one seeded generator
    draws the layers in order, so the same seed gives the same masks."""
    pruned = _pruned(weights, sparsities)
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for (name, w), p in zip(weights.items(), pruned):
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[torch.randperm(w.numel(), generator=g)[:w.numel() - p]] = True
        masks[name] = keep.reshape(w.shape).to(w.device)
    return masks


def density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of weights kept over all masks."""
    return sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))
