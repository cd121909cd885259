"""Magnitude and random pruning masks: the two data-free baselines of the pruning papers.

``magnitude_mask``: the smallest ``|W|`` go (Han et al. 2015; the layer-wise pruning of the
lottery ticket and global-magnitude papers, shared/papers/METHODS.md §13, §16). Unstructured
sparsity compares every weight of the layer with every other (not row by row, as Wanda does);
N:M compares within each run of M inputs of a row.

``random_mask``: a uniformly random subset of exactly ``round(numel · ratio)`` weights goes (or,
for N:M, M − N random inputs of every run), from a seeded generator (random pruning, §17).

Ties in magnitude fall to the earlier element in row-major order (a stable sort).
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.algorithms.wanda import check_sparsity, keep_mask
from lowbit.scheme import SparsitySpec


def magnitude_mask(W: Tensor, sparsity: SparsitySpec) -> Tensor:
    """W (rows, cols) float -> keep-mask (rows, cols) bool: the largest magnitudes stay."""
    check_sparsity(sparsity)
    if sparsity.kind == "nm":
        return keep_mask(W.abs(), sparsity)
    return _drop_lowest(W.abs().reshape(-1), round(W.numel() * sparsity.ratio)).reshape(W.shape)


def random_mask(shape: tuple[int, int], sparsity: SparsitySpec, generator: torch.Generator) -> Tensor:
    """(rows, cols) keep-mask bool with exactly the spec's zeros, drawn from ``generator``."""
    check_sparsity(sparsity)
    rows, cols = shape
    score = torch.rand(rows, cols, generator=generator)  # (rows, cols) uniform
    if sparsity.kind == "nm":
        return keep_mask(score, sparsity)
    return _drop_lowest(score.reshape(-1), round(rows * cols * sparsity.ratio)).reshape(shape)


def _drop_lowest(score: Tensor, drop: int) -> Tensor:
    """(n,) score -> (n,) bool, False at the ``drop`` lowest (stable: earlier first among ties)."""
    order = torch.sort(score, stable=True).indices[:drop]
    return torch.ones(score.numel(), dtype=torch.bool, device=score.device).index_fill_(0, order, False)
