"""The small-model checks of papers §15, §16 and §17 (shared/papers/METHODS.md) on sklearn digits.

Each function runs one seeded experiment and returns plain numbers; ``tests/pruning/
test_alloc_papers.py`` asserts the claims on few seeds, ``bench/pruning_allocation.py`` runs more
seeds and prints a table. All training is ``small.train`` (Adam, lr 1e-3, batch 64).

=================  ==========================================================================
function           experiment
=================  ==========================================================================
global_vs_uniform  §16a: one-shot magnitude pruning (global / uniform) of a trained MLP, fine-tune
collapse           §16b: the same at 99.5%, global without and with a Minimum Threshold
random_sparse      §17: fixed random masks (ERK / uniform) trained from scratch, and dense
rd_compare         §15b: DP vs uniform / ERK / global / LAMP, no fine-tuning: output MSE, accuracy
additivity         §15a: corr(δ_joint, δ_i + δ_j) over random layer pairs and amounts
dp_vs_brute        §15c: the DP against exhaustive search over the curves' grid
=================  ==========================================================================
"""
from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.algorithms import allocation as A
from lowbit.algorithms.rd_allocation import grid_pruned, rate_distortion_amounts
from lowbit.errors import LowbitError
from lowbit.pruning import rd_curves as R
from lowbit.pruning.masks import magnitude_masks, random_masks
from lowbit.pruning.small import Data, accuracy, mlp, prunable, train

ALLOCATIONS = ("uniform", "erk", "global", "lamp", "dp")


def trained_mlp(data: Data, sizes: Sequence[int], epochs: int = 30, seed: int = 0) -> nn.Module:
    model = mlp(list(sizes), seed=seed)
    train(model, data.train, epochs=epochs, seed=seed)
    return model


def allocate(model: nn.Module, method: str, sparsity: float, curves: dict | None = None,
             min_keep: int | Sequence[int] = 0) -> list[float]:
    """Per-layer sparsities of ``model``'s prunable weights by ``method`` (one of ALLOCATIONS)."""
    ws = list(prunable(model).values())
    if method == "uniform":
        return A.uniform([w.numel() for w in ws], sparsity)
    if method == "erk":
        return A.erk([tuple(w.shape) for w in ws], sparsity)
    if method == "global":
        return A.global_magnitude(ws, sparsity, min_keep)
    if method == "lamp":
        return A.lamp(ws, sparsity)
    if method == "dp" and curves is not None:
        return A.rate_distortion(list(curves.values()), [w.numel() for w in ws], sparsity)
    raise LowbitError(f"unknown allocation {method!r} (or 'dp' without curves); use one of {', '.join(ALLOCATIONS)}")


def _finetuned(model: nn.Module, data: Data, sparsities: list[float], epochs: int, seed: int) -> float:
    pruned = copy.deepcopy(model)
    masks = magnitude_masks(prunable(pruned), sparsities)
    train(pruned, data.train, epochs=epochs, masks=masks, seed=seed)
    return accuracy(pruned, data.test)


def global_vs_uniform(model: nn.Module, data: Data, sparsity: float = 0.9, finetune: int = 10,
                      seed: int = 0) -> dict[str, float]:
    """§16a test accuracies of a trained ``model``: dense, and global / uniform magnitude pruning at
    ``sparsity`` after ``finetune`` epochs (the model itself is not modified)."""
    out = {"dense": accuracy(model, data.test)}
    for method in ("global", "uniform"):
        out[method] = _finetuned(model, data, allocate(model, method, sparsity), finetune, seed)
    return out


def collapse(model: nn.Module, data: Data, min_keep: int | Sequence[int], sparsity: float = 0.995,
             finetune: int = 10, seed: int = 0) -> dict[str, dict]:
    """§16b on a trained ``model``: global magnitude without ("global") and with the Minimum Threshold
    ``min_keep`` ("global+MT"). Per variant: kept weights per layer, output sizes, total sparsity,
    test accuracy after ``finetune`` epochs."""
    ws = list(prunable(model).values())
    out = {}
    for name, mk in (("global", 0), ("global+MT", min_keep)):
        keeps = A.global_magnitude_counts(ws, sparsity, mk)
        sp = [(w.numel() - k) / w.numel() for w, k in zip(ws, keeps)]
        out[name] = {"keeps": keeps, "n_out": [w.shape[0] for w in ws],
                     "sparsity": 1 - sum(keeps) / sum(w.numel() for w in ws),
                     "accuracy": _finetuned(model, data, sp, finetune, seed)}
    return out


def random_sparse(data: Data, width: int, sparsity: float = 0.9, epochs: int = 30,
                  seed: int = 0) -> dict[str, float]:
    """§17: 64-width-width-10 MLPs trained from scratch: dense, and with a fixed random mask whose
    per-layer densities are ERK or uniform. Returns test accuracies."""
    out = {}
    for method in ("dense", "erk", "uniform"):
        model = mlp([64, width, width, 10], seed=seed)
        masks = None
        if method != "dense":
            shapes = [tuple(w.shape) for w in prunable(model).values()]
            sp = A.erk(shapes, sparsity) if method == "erk" else A.uniform([math.prod(s) for s in shapes], sparsity)
            masks = random_masks(prunable(model), sp, seed=seed)
        train(model, data.train, epochs=epochs, masks=masks, seed=seed)
        out[method] = accuracy(model, data.test)
    return out


def rd_compare(model: nn.Module, data: Data, sparsity: float, calib: int = 512, steps: int = 100,
               curves: dict | None = None) -> dict[str, dict[str, float]]:
    """§15b, no fine-tuning: per allocation, the joint output distortion on the test inputs (relative
    to the unpruned model) and test accuracy. Curves come from the first ``calib`` training inputs."""
    curves = R.layer_curves(model, data.train.x[:calib], steps) if curves is None else curves
    reference = R.logits(model, data.test.x)
    out = {}
    for method in ALLOCATIONS:
        sp = allocate(model, method, sparsity, curves)
        out[method] = {"mse": R.joint_distortion(model, data.test.x, sp, reference=reference),
                       "accuracy": R.pruned_copy_accuracy(model, data.test.x, data.test.y, sp),
                       "sparsity": sum(s * w.numel() for s, w in zip(sp, prunable(model).values())) /
                       sum(w.numel() for w in prunable(model).values())}
    return out


def additivity(model: nn.Module, x: torch.Tensor, curves: dict, pairs: int = 40, max_amount: float = 0.6,
               seed: int = 0) -> float:
    """§15a: Pearson correlation of δ_joint(i at a_i, j at a_j) with δ_i(a_i) + δ_j(a_j) over random
    pairs of distinct layers and random grid amounts up to ``max_amount``; curves measured on x."""
    rng = random.Random(seed)
    names, steps = list(curves), len(next(iter(curves.values()))) - 1
    reference = R.logits(model, x)
    joint, summed = [], []
    for _ in range(pairs):
        i, j = rng.sample(range(len(names)), 2)
        ai, aj = (rng.randint(1, int(max_amount * steps)) for _ in range(2))
        sp = [0.0] * len(names)
        sizes = [w.numel() for w in prunable(model).values()]
        sp[i], sp[j] = grid_pruned(sizes[i], ai, steps) / sizes[i], grid_pruned(sizes[j], aj, steps) / sizes[j]
        joint.append(R.joint_distortion(model, x, sp, reference=reference))
        summed.append(float(curves[names[i]][ai] + curves[names[j]][aj]))
    return float(torch.corrcoef(torch.tensor([joint, summed], dtype=torch.float64))[0, 1])


def dp_vs_brute(model: nn.Module, x: torch.Tensor, sparsity: float, steps: int = 10) -> dict[str, float]:
    """§15c on a net with few layers: the DP's additive objective vs exhaustive search of the same
    objective under the same budget, plus the true joint δ of the DP's choice and the best true δ
    found by exhaustive search (curves and δ on x)."""
    curves = R.layer_curves(model, x, steps)
    cs, sizes = list(curves.values()), [w.numel() for w in prunable(model).values()]
    budget = sum(sizes) - round(sparsity * sum(sizes))
    dp = rate_distortion_amounts(cs, sizes, sparsity)
    reference = R.logits(model, x)
    best_add, best_true = float("inf"), float("inf")
    for js in itertools.product(range(steps + 1), repeat=len(cs)):
        if sum(n - grid_pruned(n, j, steps) for n, j in zip(sizes, js)) > budget:
            continue
        best_add = min(best_add, sum(float(c[j]) for c, j in zip(cs, js)))
        best_true = min(best_true, R.joint_distortion(model, x, [grid_pruned(n, j, steps) / n for n, j in
                                                                zip(sizes, js)], reference=reference))
    return {"dp_additive": sum(float(c[j]) for c, j in zip(cs, dp)), "brute_additive": best_add,
            "dp_true": R.joint_distortion(model, x, [grid_pruned(n, j, steps) / n for n, j in zip(sizes, dp)],
                                          reference=reference),
            "brute_true": best_true}
