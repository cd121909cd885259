"""Rate-distortion allocation by dynamic programming (§15: Xu, Wang, … Lin, "Efficient Joint
Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks", ICCV'23, arXiv:2308.10438).

Input: for each layer l a distortion curve δ_l (1-D, K_l + 1 finite values), δ_l[j] measured with
layer l alone pruned by amount j / K_l (δ_l[0]: unpruned). Amount j of a layer of n weights prunes
``grid_pruned(n, j, K) = floor(j·n/K + 1/2)`` weights (nearest, halves up; integer arithmetic).

Problem: choose j_l per layer minimizing Σ_l δ_l[j_l] (the paper's additive model of the output
distortion) subject to Σ_l kept_l ≤ B, with B = N − round(sparsity·N) the kept-weight budget.
An amount whose δ is +inf is forbidden (e.g. one that would prune a whole layer); δ_l[0] must be
finite, and a budget that only forbidden amounts can meet is refused.

Discretization (the paper's DP state is kept weights; an LLM has too many to index one by one):
kept weights are counted in units of u = max(1, ceil(B / MAX_UNITS)) weights, a layer's cost
rounded UP (ceil(kept/u)), the capacity rounded DOWN (floor(B/u)). Hence, exactly:
  * the result never keeps more than B weights;
  * its Σ δ is minimal among ALL allocations that keep at most B − L·(u − 1) weights
    (L layers); for B ≤ MAX_UNITS (u = 1) it is the exact optimum under the budget.
Among allocations of equal Σ δ the one using more budget units wins, then the lower amounts (in
layer order of the backtrack). The total is NOT forced up to B: a result below B means no allocation
closer to B has a lower Σ δ (curves are usually decreasing in kept weights, so it lands within one
grid step of B). Time O(Σ_l K_l · B/u) vectorized; memory (L, B/u + 1) int16 choices, ≤ 26 MB for
200 layers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lowbit.errors import LowbitError

MAX_UNITS = 1 << 16


def grid_pruned(n: int, j: int, k: int) -> int:
    """Weights pruned at amount j/k of a layer of n weights: floor(j·n/k + 1/2), in integers."""
    return (2 * j * n + k) // (2 * k)


def _check(curves: Sequence[Tensor], sizes: Sequence[int], sparsity: float) -> None:
    if len(curves) == 0:
        raise LowbitError("no layers given; pass one distortion curve per layer")
    if len(curves) != len(sizes):
        raise LowbitError(f"{len(curves)} curves for {len(sizes)} layer sizes; pass one curve per layer")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise LowbitError(f"layer sizes must be positive integers, got {list(sizes)}")
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise LowbitError(f"sparsity {sparsity!r} is outside [0, 1); pass the fraction of weights to prune")
    for i, c in enumerate(curves):
        if not isinstance(c, Tensor) or c.ndim != 1 or not 2 <= c.numel() <= 32768:
            raise LowbitError(f"curve {i} must be a 1-D tensor of 2 to 32768 distortions (amounts 0..1), got "
                              f"{tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
        if bool(torch.isnan(c).any()) or bool((c == -torch.inf).any()) or not bool(torch.isfinite(c[0])):
            raise LowbitError(f"curve {i} has non-finite distortions (+inf only marks a forbidden amount > 0); "
                              "measure it again or clip it")


def rate_distortion_amounts(curves: Sequence[Tensor], sizes: Sequence[int], sparsity: float,
                            unit: int | None = None) -> list[int]:
    """Grid index j_l per layer (amount j_l / (len(curves[l]) − 1)); see the module docstring.

    unit: weights per budget unit (default ``max(1, ceil(B / MAX_UNITS))``; 1 = exact).
    """
    _check(curves, sizes, sparsity)
    n_total = sum(sizes)
    budget = n_total - round(float(sparsity) * n_total)
    u = max(1, -(-budget // MAX_UNITS)) if unit is None else int(unit)
    if u < 1:
        raise LowbitError(f"unit {unit} must be a positive number of weights")
    cap = budget // u
    dp = torch.full((cap + 1,), torch.inf, dtype=torch.float64)  # best Σ δ at exactly c units
    dp[0] = 0.0
    choices, costs = [], []
    for curve, n in zip(curves, sizes):
        k = curve.numel() - 1
        cost = [-(-(n - grid_pruned(n, j, k)) // u) for j in range(k + 1)]  # ceil(kept / u)
        delta = curve.detach().to("cpu", torch.float64)
        new = torch.full_like(dp, torch.inf)
        arg = torch.full((cap + 1,), -1, dtype=torch.int16)
        for j, c in enumerate(cost):
            if c > cap:
                continue
            cand = dp[:cap + 1 - c] + delta[j]  # (cap + 1 - c,)
            better = cand < new[c:]
            new[c:] = torch.where(better, cand, new[c:])
            arg[c:] = torch.where(better, torch.tensor(j, dtype=torch.int16), arg[c:])
        dp = new
        choices.append(arg)
        costs.append(cost)
    best = dp.min()
    if not bool(torch.isfinite(best)):
        raise LowbitError(f"no allocation reaches sparsity {sparsity} without a forbidden amount (+inf distortion, "
                          "e.g. a whole layer pruned); lower the sparsity or allow larger amounts")
    c = int(torch.nonzero(dp == best).max())  # the most budget used among the optima
    amounts = []
    for arg, cost in zip(reversed(choices), reversed(costs)):
        j = int(arg[c])
        amounts.append(j)
        c -= cost[j]
    return amounts[::-1]


def rate_distortion(curves: Sequence[Tensor], sizes: Sequence[int], sparsity: float) -> list[float]:
    """§15 DP allocation: per-layer sparsities ``grid_pruned(n_l, j_l, K_l) / n_l`` (see module doc).

    curves[l]: 1-D float tensor of distortions of layer l at amounts k/(len−1); sizes[l]: its weights.
    """
    amounts = rate_distortion_amounts(curves, sizes, sparsity)
    return [grid_pruned(n, j, c.numel() - 1) / n for c, n, j in zip(curves, sizes, amounts)]
