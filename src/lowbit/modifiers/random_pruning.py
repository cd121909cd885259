"""Random pruning as a modifier (Liu et al., "The Unreasonable Effectiveness of Random Pruning",
ICLR'22; shared/papers/METHODS.md §17): a seeded random mask per layer, at the density its
``allocation`` gives it ("erk" is the paper's Erdős–Rényi-Kernel; "uniform" the plain baseline).

Each layer's generator is seeded from ``seed`` and the tensor's key, so a layer's mask does not
depend on which other layers the run prunes, and the same seed gives the same bytes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.magnitude import random_mask
from lowbit.algorithms.wanda import check_sparsity
from lowbit.modifiers._allocate import WITHOUT_DATA, allocate_pairs, check_allocation
from lowbit.modifiers.base import BlockWork, LayerResult, Modifier
from lowbit.scheme import TensorScheme


@dataclass(frozen=True)
class RandomPruning(Modifier):
    """Random pruning to the scheme's sparsity; ``allocation`` "uniform" (default) or "erk"."""

    allocation: str = "uniform"
    seed: int = 0

    name = "random"
    requires = frozenset({"sparsity"})
    produces = frozenset({"sparsity"})
    changes_float = True

    def __post_init__(self) -> None:
        check_allocation(self.name, self.allocation, 0.0, allowed=WITHOUT_DATA)

    def check_scheme(self, scheme: TensorScheme) -> None:
        if scheme.sparsity is not None:
            check_sparsity(scheme.sparsity)

    @property
    def reads_all_weights(self) -> bool:
        return self.allocation != "uniform"

    def allocate(self, model: nn.Module, pairs: list, batches: list | None = None, progress: bool = True) -> list:
        return allocate_pairs(self.name, self.allocation, 0.0, model, pairs)

    def solve_layer(self, W: Tensor, stats: None, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 -> W with a random subset zeroed, and its keep-mask."""
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        mask = random_mask(tuple(W.shape), scheme.sparsity, g).to(W.device)
        pruned = 1.0 - mask.float().mean().item()
        return LayerResult(weight=W.masked_fill(~mask, 0.0), mask=mask, info={"pruned": round(pruned, 6)})

    def memory(self, work: BlockWork) -> int:
        return max((21 * r * c for r, c in work.layers), default=0)
