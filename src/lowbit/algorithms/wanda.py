"""Wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", arXiv:2306.11695): prune by weight magnitude times input norm, compared within each row.

For a linear layer ``y = x Wᵀ`` with W (rows, cols) and calibration inputs X (tokens, cols) the
saliency of a weight is ``S[i, j] = |W[i, j]| · ||X[:, j]||₂``. Weights compete only with the
other weights of their own output row (the paper's per-output comparison group):

==============  ==============================================================================
sparsity kind   what is zeroed in each row
==============  ==============================================================================
unstructured    the ``round(cols · ratio)`` lowest saliencies
nm (N:M)        in every run of M consecutive columns, all but the N highest saliencies
==============  ==============================================================================

Ties are broken by column index: among equal saliencies the lower column is pruned first (a
stable sort). ``keep_mask`` takes any (rows, cols) score, so magnitude pruning is
``keep_mask(W.abs(), spec)``.

Where this guesses: the paper's code prunes ``int(cols · ratio)`` weights per row; this rounds to
the nearest count instead (the same for every ratio whose product is an integer, e.g. 50% of an
even width), so that 0.29 of 100 columns prunes 29, not 28.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.scheme import SparsitySpec


class ColumnSquares:
    """Running per-column sum of squares of a layer's inputs: ``sq[j] = Σ_tokens x[t, j]²``.

    ``sq`` (cols,) float64 on the device of the first input; ``n`` tokens seen. ``update`` takes
    x (..., cols) of any float dtype; leading dimensions are flattened into tokens. The squares
    are formed in float32 (one (tokens, cols) temporary) and summed in float64.
    """

    def __init__(self, cols: int) -> None:
        if cols < 1:
            raise LowbitError(f"input statistics need at least one column, got {cols}")
        self.sq = torch.zeros(cols, dtype=torch.float64)
        self.n = 0

    @property
    def cols(self) -> int:
        return self.sq.shape[0]

    def update(self, x: Tensor) -> None:
        if x.shape[-1] != self.cols:
            raise LowbitError(f"input has {x.shape[-1]} features but the statistics have {self.cols} columns")
        x = x.detach().reshape(-1, self.cols)  # (tokens, cols)
        if self.n == 0 and x.device != self.sq.device:
            self.sq = self.sq.to(x.device)
        self.sq += x.to(self.sq.device, torch.float32).square().sum(0, dtype=torch.float64)
        self.n += x.shape[0]

    def norms(self) -> Tensor:
        """(cols,) float32: ``||X[:, j]||₂`` over every token seen."""
        return self.sq.sqrt().to(torch.float32)


def saliency(W: Tensor, norms: Tensor) -> Tensor:
    """Wanda's score: W (rows, cols) float, norms (cols,) -> ``|W| · norms`` (rows, cols) float32."""
    if norms.shape != (W.shape[1],):
        raise LowbitError(f"{norms.shape[0] if norms.ndim == 1 else tuple(norms.shape)} input norms do not match "
                          f"a weight of {W.shape[1]} columns")
    return W.abs().to(torch.float32) * norms.to(W.device, torch.float32)[None, :]  # (rows, cols)


def keep_mask(score: Tensor, sparsity: SparsitySpec) -> Tensor:
    """(rows, cols) bool, True where a weight is kept: per row, the lowest ``score`` are dropped.

    unstructured: ``round(cols · ratio)`` zeros per row. nm: ``cols`` must be a multiple of ``m``;
    exactly ``n`` kept in every (row, run of ``m`` columns). channel sparsity is not per row and
    is refused.
    """
    check_sparsity(sparsity)
    rows, cols = score.shape
    if sparsity.kind == "unstructured":
        drop = round(cols * sparsity.ratio)
        order = torch.sort(score, dim=1, stable=True).indices[:, :drop]  # (rows, drop) lowest first
        return torch.ones(rows, cols, dtype=torch.bool, device=score.device).scatter_(1, order, False)
    n, m = sparsity.n, sparsity.m  # N:M
    if cols % m:
        raise LowbitError(f"N:M sparsity {n}:{m} needs the input width to be a multiple of {m}, but this "
                          f"layer has {cols} inputs; leave it out of the plan or use unstructured sparsity")
    runs = score.reshape(rows, cols // m, m)  # (rows, runs, m)
    order = torch.sort(runs, dim=2, stable=True).indices[:, :, :m - n]  # (rows, runs, m - n) lowest first
    keep = torch.ones_like(runs, dtype=torch.bool).scatter_(2, order, False)
    return keep.reshape(rows, cols)


def check_sparsity(sparsity: SparsitySpec) -> None:
    """Raise ``LowbitError`` for a sparsity a per-row selection cannot make (channel sparsity)."""
    if sparsity.kind not in ("unstructured", "nm"):
        raise LowbitError(f"{sparsity.kind} sparsity removes whole input channels, which a per-row selection does "
                          "not do (structured pruning is a method of its own); use unstructured (s=50%) or N:M "
                          "(s=2:4) sparsity")


def wanda(W: Tensor, norms: Tensor, sparsity: SparsitySpec) -> tuple[Tensor, Tensor]:
    """W (rows, cols) float, input norms (cols,) -> (pruned W (rows, cols) float32, keep mask bool)."""
    mask = keep_mask(saliency(W, norms), sparsity)
    return W.to(torch.float32).masked_fill(~mask, 0.0), mask  # +0.0 where pruned, never -0.0
