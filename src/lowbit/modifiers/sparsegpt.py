"""SparseGPT (Frantar & Alistarh, arXiv:2301.00774) as a modifier: the Hessian of each layer's
inputs, then ``lowbit.algorithms.sparsegpt``'s column loop.

With a scheme that has only a sparsity (``s=50%``) it prunes and keeps float weights (zeros in
place, keep-mask recorded). With a weight spec too (``uint4:g64+s=2:4``) it prunes and quantizes
in one pass, the paper's joint mode; but when a later stage of the recipe quantizes the same
tensor (``--method sparsegpt+gptq``) the plan leaves the weight to that stage, which then keeps
the mask (GPTQ's ``keeps_mask``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lowbit.algorithms import sparsegpt as algo
from lowbit.algorithms._hessian import HessianStats
from lowbit.errors import LowbitError
from lowbit.modifiers._allocate import LayerAdaptive
from lowbit.modifiers.base import BlockWork, LayerResult, Modifier, tensor_scale
from lowbit.modifiers.gptq import GPTQ
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class SparseGPT(LayerAdaptive, Modifier):
    """SparseGPT to the scheme's sparsity (unstructured or N:M), quantizing too when the scheme
    has a weight spec; options as ``lowbit.algorithms.sparsegpt.SparseGPT``."""

    damp: float = algo.DEFAULT_DAMP
    block_size: int = 128
    act_order: bool = False
    allocation: str = "uniform"
    min_keep: float = 0.0
    rd_steps: int = 10
    rd_tokens: int = 256

    name = "sparsegpt"
    rd_criterion = "wanda"  # our guess: OBS saliency w²/[H⁻¹]_jj is Wanda's score² for a diagonal H
    needs_data = True
    requires = frozenset({"sparsity"})
    produces = frozenset({"sparsity", "weight"})
    changes_float = True

    def __post_init__(self) -> None:
        self.config  # validates the options
        self.check_allocation()

    @property
    def config(self) -> algo.SparseGPT:
        return algo.SparseGPT(self.damp, self.block_size, self.act_order)

    def check_scheme(self, scheme: TensorScheme) -> None:
        """Refuse channel sparsity, and N:M with act-order, before any block runs."""
        sp = scheme.sparsity
        if sp is not None and sp.kind not in ("unstructured", "nm"):
            raise LowbitError(f"sparsegpt prunes single weights (s=50% or s=2:4), not {sp.kind} sparsity; "
                              "structured pruning is `lowbit prune --structure`")
        if sp is not None and sp.kind == "nm" and self.act_order:
            raise LowbitError("sparsegpt with N:M sparsity cannot use act_order=True; leave it False")

    def new_stats(self, cols: int) -> HessianStats:
        return HessianStats(cols)

    def solve_layer(self, W: Tensor, stats: HessianStats | None, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 and its inputs' Hessian -> pruned (and quantized) weight and its mask."""
        if stats is None or stats.n == 0:
            raise LowbitError(f"{key}: sparsegpt needs the layer's calibration inputs, and it saw none; pass "
                              "calibration data (--calib) that reaches this layer")
        spec = scheme.weight
        gscale = None if spec is None else tensor_scale(spec, W, global_scale)
        r = self.config.solve(W, stats.H, scheme.sparsity, spec, gscale)
        info = {"tokens": stats.n, "damp": r.damp_used, "loss": r.loss, "dead": r.dead,
                "pruned": round(1.0 - r.keep.float().mean().item(), 6)}
        if spec is None:
            return LayerResult(weight=r.weight, mask=r.keep, info=info)
        return LayerResult(spec, r.codes, r.scale, r.zero, gscale, mask=r.keep, info=info)

    def memory(self, work: BlockWork) -> int:
        """GPTQ's (Hessians and the solver's working set) plus a (rows, cols) bool mask."""
        return GPTQ.memory(self, work) + max((r * c for r, c in work.layers), default=0)

    def flops(self, work: BlockWork) -> float:
        """GPTQ's, plus sorting the saliencies once (about rows·cols·log2(rows·block))."""
        sort = sum(r * c * max(1, (r * self.block_size).bit_length()) for r, c in work.layers)
        return GPTQ.flops(self, work) + float(sort)
