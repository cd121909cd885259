"""Magnitude pruning as a modifier: data-free, the smallest weights of each layer go
(``lowbit.algorithms.magnitude``), each layer at its allocated sparsity.

``allocation`` (``lowbit.modifiers._allocate``): "uniform" prunes every layer to the scheme's
ratio (layer-wise magnitude pruning); "global" is global magnitude pruning, one threshold over
all the targeted weights, with ``min_keep`` the fraction of each layer that always stays (the
Minimum Threshold of Gupta et al., which prevents layer collapse at extreme sparsity); "erk" and
"lamp" use those papers' per-layer ratios; "rd" (§15) measures each layer's rate-distortion curve on
calibration data, the one case where magnitude pruning needs data.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lowbit.algorithms.magnitude import magnitude_mask
from lowbit.algorithms.wanda import check_sparsity
from lowbit.modifiers._allocate import LayerAdaptive
from lowbit.modifiers.base import BlockWork, LayerResult, Modifier
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class Magnitude(LayerAdaptive, Modifier):
    """Magnitude pruning to the scheme's sparsity (unstructured or N:M); see the module docstring."""

    allocation: str = "uniform"
    min_keep: float = 0.0
    rd_steps: int = 10
    rd_tokens: int = 256

    name = "magnitude"
    needs_data_when = "--allocation rd"  # for `lowbit methods`
    requires = frozenset({"sparsity"})
    produces = frozenset({"sparsity"})
    changes_float = True

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Data-free, except allocation="rd", which measures each layer on calibration data."""
        return self.allocation == "rd"

    def __post_init__(self) -> None:
        self.check_allocation()

    def check_scheme(self, scheme: TensorScheme) -> None:
        if scheme.sparsity is not None:
            check_sparsity(scheme.sparsity)

    def solve_layer(self, W: Tensor, stats: None, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 -> the pruned weight (+0.0 where pruned) and its keep-mask."""
        mask = magnitude_mask(W, scheme.sparsity)
        pruned = 1.0 - mask.float().mean().item()
        return LayerResult(weight=W.masked_fill(~mask, 0.0), mask=mask, info={"pruned": round(pruned, 6)})

    def memory(self, work: BlockWork) -> int:
        """The sort of the largest layer: |W|, sorted values and int64 order, mask (about 21 B/weight)."""
        return max((21 * r * c for r, c in work.layers), default=0)
