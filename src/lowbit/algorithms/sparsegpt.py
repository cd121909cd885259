"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", arXiv:2301.00774): prune a weight column by column, spreading each pruned weight's
value over the not-yet-visited columns through the inverse Hessian, exactly as GPTQ spreads its
rounding error. It runs GPTQ's own column loop (``lowbit.algorithms.gptq.solve_columns``) with a
mask selector, so pruning, quantization, or both at once (the paper's joint mode) are one pass.

Masks are chosen adaptively, from the weights as already updated by the earlier columns, with
the OBS saliency ``w² / [H⁻¹]_jj²`` (``[H⁻¹]_jj`` read as the squared diagonal of GPTQ's upper
Cholesky factor ``U`` of ``H⁻¹``, as in the reference code):

==============  ==============================================================================
sparsity kind   what is pruned
==============  ==============================================================================
unstructured    at the start of every lazy block of ``block_size`` columns (128 by default),
                the ``round(rows · b · ratio)`` lowest saliencies of the whole (rows, b) block
nm (N:M)        at the first column of every run of M columns, in each row the M − N lowest
==============  ==============================================================================

Where this guesses or departs from the reference code: it prunes exactly
``round(rows · b · ratio)`` weights per block (the reference prunes everything at or below the
``int(numel · ratio)``-th smallest saliency, one more and any ties); ties fall to the earlier
element of the flattened (b, rows) block. Act-order is off by default, as in the reference, and
N:M refuses it (runs must be consecutive original columns). The default dampening 0.01 is the
reference's; ``bench/prune.py`` measures it against others.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lowbit.algorithms.gptq import GPTQ, ColumnResult, Selector, solve_columns
from lowbit.errors import LowbitError
from lowbit.scheme import SparsitySpec
from lowbit.spec import QuantSpec

#: relative dampening (a fraction of mean(diag H)) of the reference code
DEFAULT_DAMP = 0.01


@dataclass(frozen=True)
class SparseGPT:
    """How SparseGPT runs: damp, block_size and act_order as in ``GPTQ`` (validated by it)."""

    damp: float = DEFAULT_DAMP
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        self.gptq  # validates

    @property
    def gptq(self) -> GPTQ:
        return GPTQ(self.damp, self.block_size, self.act_order, None if self.act_order else False)

    def solve(self, W: Tensor, H: Tensor, sparsity: SparsitySpec, spec: QuantSpec | None = None,
              global_scale: Tensor | None = None) -> ColumnResult:
        """:func:`sparsegpt` with this configuration."""
        return sparsegpt(W, H, sparsity, spec, damp=self.damp, block_size=self.block_size,
                         act_order=self.act_order, global_scale=global_scale)


def sparsegpt(W: Tensor, H: Tensor, sparsity: SparsitySpec, spec: QuantSpec | None = None, *,
              damp: float = DEFAULT_DAMP, block_size: int = 128, act_order: bool = False,
              global_scale: Tensor | None = None) -> ColumnResult:
    """Prune (and, given ``spec``, quantize) a (rows, cols) matrix view with SparseGPT.

    W: (rows, cols) float (not modified); H: (cols, cols) proxy Hessian ``(2/n)·Σ xᵀx``.
    Returns ``ColumnResult``: ``keep`` (rows, cols) bool; without a spec ``weight`` (rows, cols)
    float32 with +0.0 where pruned; with one, GPTQ's codes and grids (pruned weights' codes are
    whatever the format gives 0; the keep-mask zeroes them on dequantization).
    """
    if sparsity.kind not in ("unstructured", "nm"):
        raise LowbitError(f"SparseGPT prunes single weights (unstructured, e.g. s=50%, or N:M, e.g. s=2:4), "
                          f"not {sparsity.kind} sparsity")
    rows, cols = W.shape
    if sparsity.kind == "nm":
        if act_order:
            raise LowbitError("SparseGPT with N:M sparsity cannot use act_order: each run of M must be consecutive "
                              "original columns; set act_order=False")
        if cols % sparsity.m:
            raise LowbitError(f"N:M sparsity {sparsity.n}:{sparsity.m} needs the input width to be a multiple of "
                              f"{sparsity.m}, but this layer has {cols} inputs; use unstructured sparsity for it")
        if block_size % sparsity.m:
            raise LowbitError(f"SparseGPT block_size {block_size} must be a multiple of M={sparsity.m} for N:M")
    cfg = GPTQ(damp, block_size, act_order, None if act_order else False)
    return solve_columns(W, H, spec, cfg, global_scale, lambda perm: selector(sparsity))


def selector(sparsity: SparsitySpec) -> Selector:
    """The adaptive mask selector of ``sparsity`` for ``solve_columns`` (see the module table)."""
    if sparsity.kind == "unstructured":
        def select(i: int, j: int, W1: Tensor, d1: Tensor) -> Tensor | None:
            if i:
                return None
            score = W1.square() / d1.square()[:, None]  # (b, rows)
            drop = round(score.numel() * sparsity.ratio)
            order = torch.sort(score.reshape(-1), stable=True).indices[:drop]
            keep = torch.ones(score.numel(), dtype=torch.bool, device=W1.device)
            return keep.index_fill_(0, order, False).reshape(score.shape)
        return select
    n, m = sparsity.n, sparsity.m

    def select_nm(i: int, j: int, W1: Tensor, d1: Tensor) -> Tensor | None:
        if j % m:
            return None
        if W1.shape[0] - i < m:
            raise LowbitError(f"SparseGPT's lazy blocks must hold whole N:M runs of {m} columns; use a group size "
                              f"(and block_size) that is a multiple of {m}")
        score = W1[i:i + m].square() / d1[i:i + m].square()[:, None]  # (m, rows)
        order = torch.sort(score, dim=0, stable=True).indices[:m - n]  # (m - n, rows) lowest per row
        return torch.ones_like(score, dtype=torch.bool).scatter_(0, order, False)
    return select_nm
