"""Wanda (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language
Models", arXiv:2306.11695) as a modifier: the per-column input norms of each layer, then
``lowbit.algorithms.wanda``'s per-row selection of ``|W| · ||X_j||₂`` under the scheme's sparsity.

The weight stays float with zeros where it was pruned; the engine records the keep-mask
(``attach_mask``), and a later quantizing stage (``--method wanda+rtn``) carries it into the
QuantizedTensor. Statistics come from the engine's sequential pass, so each block sees the
inputs of the already pruned blocks before it, as in the paper's code.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lowbit.algorithms.wanda import ColumnSquares, check_sparsity, wanda
from lowbit.errors import LowbitError
from lowbit.modifiers._allocate import LayerAdaptive
from lowbit.modifiers.base import BlockWork, LayerResult, Modifier
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class Wanda(LayerAdaptive, Modifier):
    """Wanda pruning to the scheme's sparsity (unstructured or N:M); ``allocation`` and ``min_keep``
    give each layer its own unstructured ratio (``lowbit.modifiers._allocate``), default uniform."""

    allocation: str = "uniform"
    min_keep: float = 0.0
    rd_steps: int = 10
    rd_tokens: int = 256

    name = "wanda"
    rd_criterion = "wanda"  # the rd curves prune by Wanda's own score
    needs_data = True
    requires = frozenset({"sparsity"})
    produces = frozenset({"sparsity"})
    changes_float = True

    def __post_init__(self) -> None:
        self.check_allocation()

    def check_scheme(self, scheme: TensorScheme) -> None:
        """Refuse channel sparsity before any block runs (the per-row selection cannot make it)."""
        if scheme.sparsity is not None:
            check_sparsity(scheme.sparsity)

    def new_stats(self, cols: int) -> ColumnSquares:
        return ColumnSquares(cols)

    def solve_layer(self, W: Tensor, stats: ColumnSquares | None, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 and its inputs' column squares -> pruned W and its keep-mask."""
        if stats is None or stats.n == 0:
            raise LowbitError(f"{key}: wanda needs the layer's calibration inputs, and it saw none; pass "
                              "calibration data (--calib) that reaches this layer")
        pruned, mask = wanda(W, stats.norms(), scheme.sparsity)
        zeros = 1.0 - mask.float().mean().item()
        return LayerResult(weight=pruned, mask=mask, info={"tokens": stats.n, "pruned": round(zeros, 6)})

    def memory(self, work: BlockWork) -> int:
        """One (cols,) float64 accumulator per layer, plus the selection's working set for the
        largest layer: about 25 bytes per weight (|W|, score, sorted values, int64 order, mask,
        pruned copy)."""
        accumulators = sum(8 * c for _, c in work.layers)
        working = max((25 * r * c for r, c in work.layers), default=0)
        return accumulators + working

    def flops(self, work: BlockWork) -> float:
        """Squaring and summing the inputs (2·tokens·cols per layer) and the per-row sort of the
        scores (about rows·cols·log2(cols) comparisons, counted as operations)."""
        return float(sum(2 * work.tokens * c + r * c * max(1, c.bit_length()) for r, c in work.layers))
