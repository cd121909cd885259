"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323) as a modifier: the Hessian of each layer's inputs, then
``lowbit.algorithms.gptq``'s column loop through the spec's own format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lowbit.algorithms import gptq as algo
from lowbit.algorithms._hessian import HessianStats
from lowbit.modifiers.base import BlockWork, LayerResult, Modifier, tensor_scale
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class GPTQ(Modifier):
    """GPTQ; the options and their measured defaults are ``lowbit.algorithms.gptq.GPTQ``'s."""

    damp: float = algo.GPTQ.damp
    block_size: int = algo.GPTQ.block_size
    act_order: bool = algo.GPTQ.act_order
    static_groups: bool | None = algo.GPTQ.static_groups

    name = "gptq"
    needs_data = True
    keeps_mask = True

    def __post_init__(self) -> None:
        self.config  # validates the options

    @property
    def config(self) -> algo.GPTQ:
        return algo.GPTQ(self.damp, self.block_size, self.act_order, self.static_groups)

    def new_stats(self, cols: int) -> HessianStats:
        return HessianStats(cols)

    def solve_layer(self, W: Tensor, stats: HessianStats, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None, keep: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 and its inputs' Hessian -> GPTQ's codes and grids; ``keep``
        (rows, cols) bool: an earlier stage's keep-mask, whose pruned weights stay zero."""
        spec = scheme.weight
        gscale = tensor_scale(spec, W, global_scale)
        r = self.config.solve(W, stats.H, spec, gscale, keep)
        info = {"tokens": stats.n, "damp": r.damp_used, "damp_raised": r.damp_used > self.damp, "loss": r.loss,
                "dead": r.dead}
        return LayerResult(spec, r.codes, r.scale, r.zero, gscale, info=info)

    def memory(self, work: BlockWork) -> int:
        """One (cols, cols) Hessian per layer, plus the solver's working set for the largest:
        four (rows, cols) and four (cols, cols) float32 matrices (measured, see ``engine.forecast``)."""
        hessians = sum(c * c * 4 for _, c in work.layers)
        solver = max(((4 * r * c + 4 * c * c) * 4 for r, c in work.layers), default=0)
        return hessians + solver

    def flops(self, work: BlockWork) -> float:
        """Per layer: the Hessian's products X^T X (2·tokens·cols²), the column-by-column updates
        (2·rows·cols²) and the Cholesky factorizations and inverse (about 2·cols³)."""
        return float(sum(2 * work.tokens * c * c + 2 * r * c * c + 2 * c ** 3 for r, c in work.layers))
