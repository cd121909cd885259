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
rd            rate-distortion by dynamic programming (Xu et al., §15): each layer's curve of the
              logits' distortion against its pruned amount (pruned by magnitude, or for wanda and
              sparsegpt by Wanda's score, ``rd_criterion``), measured on ``rd_tokens``
              calibration tokens at ``rd_steps`` amounts (``lowbit.pruning.rd_output``), then the
              allocation of least total distortion within the run's budget
              (``lowbit.algorithms.rd_allocation``; per-layer ratios are multiples of 1/rd_steps). No
              layer is pruned whole; ``min_keep`` raises that floor to a fraction of each layer.
              The curves come from the unmodified model at planning, so a resumed run measures
              them again and gets the same allocation
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

ALLOCATIONS = ("uniform", "global", "erk", "lamp", "rd")
WITHOUT_DATA = tuple(a for a in ALLOCATIONS if a != "rd")  # what a method that never sees data can take


def check_allocation(name: str, allocation: str, min_keep: float, rd_steps: int = 10, rd_tokens: int = 256,
                     allowed: tuple[str, ...] = ALLOCATIONS) -> None:
    if allocation not in allowed:
        raise LowbitError(f"{name}: allocation {allocation!r} unknown; use one of {', '.join(allowed)}")
    for option, value in (("rd_steps", rd_steps), ("rd_tokens", rd_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LowbitError(f"{name}: {option} {value!r} must be a positive integer")
    if rd_steps > 1000:
        raise LowbitError(f"{name}: rd_steps {rd_steps} is more amounts than a curve can use; try 10 to 100")
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 <= min_keep < 1:
        raise LowbitError(f"{name}: min_keep {min_keep!r} must be a fraction of each layer's weights in [0, 1), "
                          "e.g. 0.01")
    if min_keep and allocation not in ("global", "rd"):
        raise LowbitError(f"{name}: min_keep applies to allocation=global or rd only (allocation is {allocation!r})")


def allocate_pairs(name: str, allocation: str, min_keep: float, model: nn.Module, pairs: list,
                   batches: list | None = None, rd_steps: int = 10, rd_tokens: int = 256,
                   progress: bool = True, rd_criterion: str = "magnitude") -> list:
    """``pairs`` with each unstructured sparsity replaced by its layer's allocated ratio.

    batches: the run's calibration batches ((B, T) int64 token ids), needed by allocation="rd" only.
    """
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
    elif allocation == "lamp":
        ratios = alloc.lamp(weights, target)
    else:
        ratios = _rate_distortion(name, model, pairs, batches, target, rd_steps, rd_tokens, min_keep, progress,
                                  rd_criterion)
    out = []
    for (t, s), r in zip(pairs, ratios):
        if r <= 0:
            continue  # left dense
        if r >= 1:
            raise LowbitError(f"{name}: allocation={allocation} would prune all of {t.key}; lower the sparsity or "
                              "use allocation=global with min_keep (e.g. 0.01)")
        out.append((t, TensorScheme(s.weight, s.input, SparsitySpec("unstructured", ratio=float(r)))))
    return out


class LayerAdaptive:
    """Mixin for a pruning modifier whose dataclass has the fields ``allocation``, ``min_keep``,
    ``rd_steps`` and ``rd_tokens``: their checks, and the ``allocate`` hook that applies them.
    ``rd_criterion``: which weights an amount prunes in the rd curves (``rd_output.CRITERIA``)."""

    rd_criterion = "magnitude"

    def check_allocation(self) -> None:
        check_allocation(self.name, self.allocation, self.min_keep, self.rd_steps, self.rd_tokens)

    @property
    def reads_all_weights(self) -> bool:
        return self.allocation != "uniform"

    def allocate(self, model: nn.Module, pairs: list, batches: list | None = None, progress: bool = True) -> list:
        """Per-layer unstructured ratios (module docstring); uniform leaves the pairs as planned."""
        return allocate_pairs(self.name, self.allocation, self.min_keep, model, pairs, batches, self.rd_steps,
                              self.rd_tokens, progress, self.rd_criterion)


def _rate_distortion(name: str, model: nn.Module, pairs: list, batches: list | None, target: float, steps: int,
                     tokens: int, min_keep: float, progress: bool, criterion: str) -> list[float]:
    from lowbit.algorithms.rd_allocation import rate_distortion
    from lowbit.pruning.rd_output import calibration_tokens, output_curves

    if batches is None:
        raise LowbitError(f"{name}: allocation=rd measures each layer's distortion on calibration data, which this "
                          "run has none of; pass calibration windows (--calib pydoc / calib=...)")
    params = [(f"{t.module_name}.{t.param}" if t.module_name else t.param,
               getattr(model.get_submodule(t.module_name), t.param)) for t, _ in pairs]
    keep = [max(1, int(min_keep * w.numel() + 0.999999)) for _, w in params]  # never a whole layer
    curves = output_curves(model, params, calibration_tokens(batches, tokens), steps, keep=keep, criterion=criterion,
                           progress=progress)
    return rate_distortion(curves, [w.numel() for _, w in params], target)


def _matrix(model: nn.Module, t) -> torch.Tensor:
    w = getattr(model.get_submodule(t.module_name), t.param)
    if w.device.type == "meta":
        raise LowbitError(f"layer-adaptive allocation reads every targeted weight, but {t.key} is not in memory "
                          "(streamed from disk); use allocation=uniform for a streamed run")
    return matrix_view(w.detach(), t.layout)
