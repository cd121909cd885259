"""Per-layer sparsity allocations: how many weights each layer keeps for a global sparsity target.

Every function returns per-layer sparsities (fraction of zeros, one float per layer, input order).
A result ``s`` converts back to the exact count with ``round(s · n)`` zeros; ``keep_largest`` turns
a count into a mask with the same tie order the magnitude allocations use.

=================  ===================================================================  ==========
function           rule                                                                  paper
=================  ===================================================================  ==========
uniform            every layer at the target                                             -
global_magnitude   one |w| threshold over all layers, optional per-layer minimum (MT)    §16
erk                density ∝ Σ dims / Π dims ("erk") or (n_in + n_out)/(n_in·n_out) ("er")  §17
lamp               one threshold on LAMP scores w_u² / Σ_{v ≥ u} w_v² (sorted by |w|)     LAMP
rate_distortion    DP minimizing Σ_l δ_l(s_l) under the kept-weight budget               §15
=================  ===================================================================  ==========

Papers: Gupta et al., "Is Complexity Required for Neural Network Pruning? A Case Study on Global
Magnitude Pruning" (arXiv:2209.14624); Liu et al., "The Unreasonable Effectiveness of Random
Pruning" (arXiv:2202.02643); Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning"
(arXiv:2010.07611); Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in
Deep Neural Networks" (arXiv:2308.10438). The DP lives in ``rd_allocation``.

Count rule shared by the magnitude-style allocations: ``k = round(sparsity · N)`` weights are pruned
(N = all weights), the smallest scores first; equal scores are pruned in (layer, flat index) order.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import torch
from torch import Tensor

from lowbit.algorithms.rd_allocation import rate_distortion
from lowbit.errors import LowbitError

__all__ = ["uniform", "global_magnitude", "global_magnitude_counts", "erk", "lamp", "lamp_scores",
           "rate_distortion", "keep_largest"]

_GATHER = 1 << 22  # candidates gathered and sorted once the threshold window holds at most this many


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise LowbitError(f"sparsity {sparsity!r} is outside [0, 1); pass the fraction of weights to prune, "
                          "e.g. 0.9 for 90%")
    return float(sparsity)


def check_sizes(sizes: Sequence[int]) -> list[int]:
    if len(sizes) == 0:
        raise LowbitError("no layers given; pass at least one layer size")
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad:
        raise LowbitError(f"layer sizes must be positive integers, got {bad[0]!r}")
    return list(sizes)


def uniform(sizes: Sequence[int], sparsity: float) -> list[float]:
    """Every layer at ``sparsity`` (layer-wise pruning). sizes: weights per layer (validated only)."""
    check_sizes(sizes)
    return [check_sparsity(sparsity)] * len(sizes)


def keep_largest(score: Tensor, keep: int) -> Tensor:
    """Bool mask of ``score``'s shape, True for the ``keep`` largest entries; among equal scores the
    lower flat index is pruned first (a stable sort), the order ``global_magnitude`` counts with."""
    n = score.numel()
    if not 0 <= keep <= n:
        raise LowbitError(f"cannot keep {keep} of {n} weights; keep must be in [0, {n}]")
    drop = torch.sort(score.reshape(-1), stable=True).indices[:n - keep]  # (n - keep,) smallest first
    return torch.ones(n, dtype=torch.bool, device=score.device).index_fill_(0, drop, False).reshape(score.shape)


def _bits(x: Tensor) -> Tensor:
    """Non-negative floats -> int64 keys with the same order (IEEE bit patterns of float64)."""
    return x.to(torch.float64).view(torch.int64)


def _kth_smallest(layers: Sequence[Tensor], k: int, key: Callable[[Tensor], Tensor]) -> float:
    """The k-th smallest (1-based) of ``key(layer)`` over all layers, never concatenating them.

    Bisection on the float64 bit pattern with per-layer counts; once the window (lo, hi] holds at
    most ``_GATHER`` values they are gathered and sorted. Memory: one layer's keys at a time plus the
    gathered window. key must give non-negative finite values.
    """
    lo, hi = -1, _bits(torch.tensor(math.inf)).item()  # bit patterns; count(<= lo) < k <= count(<= hi)
    c_lo, c_hi = 0, sum(t.numel() for t in layers)
    while c_hi - c_lo > _GATHER and hi - lo > 1:
        mid = (lo + hi) // 2
        c = sum(int((_bits(key(t)) <= mid).sum()) for t in layers)
        if c >= k:
            hi, c_hi = mid, c
        else:
            lo, c_lo = mid, c
    if hi - lo == 1:  # the window holds one value, repeated (e.g. many exact zeros): nothing to gather
        return torch.tensor(hi, dtype=torch.int64).view(torch.float64).item()
    window = torch.cat([v[(v > lo) & (v <= hi)].cpu() for v in (_bits(key(t)).reshape(-1) for t in layers)])
    return torch.sort(window).values[k - c_lo - 1].view(torch.float64).item()


def _threshold_counts(layers: Sequence[Tensor], prune: int, key: Callable[[Tensor], Tensor]) -> list[int]:
    """Per-layer numbers of entries pruned when the ``prune`` smallest keys overall go (ties in order)."""
    if prune == 0:
        return [0] * len(layers)
    t = _kth_smallest(layers, prune, key)
    counts = []
    left = prune - sum(int((key(x).double() < t).sum()) for x in layers)  # ties still to prune
    for x in layers:
        v = key(x).double()
        ties = min(left, int((v == t).sum()))
        left -= ties
        counts.append(int((v < t).sum()) + ties)
    return counts


def _magnitude(t: Tensor) -> Tensor:
    return t.detach().abs()


def _check_weights(weights: Sequence[Tensor]) -> list[int]:
    sizes = check_sizes([int(w.numel()) for w in weights])
    for i, w in enumerate(weights):
        if not torch.is_floating_point(w) or not bool(torch.isfinite(w).all()):
            raise LowbitError(f"layer {i} weight must be finite floats, got dtype {w.dtype} with non-finite or "
                              "non-float values")
    return sizes


def _min_keep(min_keep: int | Sequence[int], sizes: list[int]) -> list[int]:
    per = [min_keep] * len(sizes) if isinstance(min_keep, int) else list(min_keep)
    if len(per) != len(sizes):
        raise LowbitError(f"min_keep has {len(per)} entries for {len(sizes)} layers; pass one per layer or one int")
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in per):
        raise LowbitError(f"min_keep must be non-negative integers, got {per}")
    return [min(m, n) for m, n in zip(per, sizes)]


def global_magnitude_counts(weights: Sequence[Tensor], sparsity: float,
                            min_keep: int | Sequence[int] = 0) -> list[int]:
    """Weights KEPT per layer by global magnitude pruning (§16) with the Minimum Threshold.

    weights: any float tensors (any shape, dtype, device); N = total size, ``round(sparsity·N)`` pruned.
    Without a minimum this is one |w| threshold over all layers, ties pruned in (layer, index) order.
    min_keep (int for all layers, or one per layer): every layer keeps at least ``min(min_keep, n_l)``
    (a layer smaller than that is not pruned). Layers that the threshold leaves below their minimum
    are fixed at it and the threshold is recomputed over the rest with the remaining budget, until
    no layer falls below (each round fixes ≥ 1 layer; a fixed layer stays below the rising threshold,
    so the fixed point keeps the globally largest weights subject to the minima). The total hits the
    target exactly. GlobalMP's own code rescales sparsities instead; this exact-count re-threshold is
    our reading of "re-distributed to hit the target".
    Memory: no concatenated copy; one layer's float64 |w| at a time plus ≤ 4M gathered candidates
    (32 MiB); about 20-40 passes over the weights for an LLM.
    """
    sizes, s = _check_weights(weights), check_sparsity(sparsity)
    mins = _min_keep(min_keep, sizes)
    budget = sum(sizes) - round(s * sum(sizes))  # weights kept in total
    if sum(mins) > budget:
        raise LowbitError(f"the minimum keeps {sum(mins)} weights but sparsity {s} keeps only {budget} of "
                          f"{sum(sizes)}; lower min_keep or the sparsity")
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(sizes)) if i not in fixed]
        keep_free = budget - sum(fixed.values())
        pruned = _threshold_counts([weights[i] for i in free], sum(sizes[i] for i in free) - keep_free, _magnitude)
        keeps = {i: sizes[i] - p for i, p in zip(free, pruned)}
        low = {i: mins[i] for i, k in keeps.items() if k < mins[i]}
        if not low:
            return [fixed.get(i, keeps.get(i)) for i in range(len(sizes))]
        fixed.update(low)


def global_magnitude(weights: Sequence[Tensor], sparsity: float, min_keep: int | Sequence[int] = 0) -> list[float]:
    """§16 global magnitude pruning: per-layer sparsities from ``global_magnitude_counts`` (which see)."""
    keeps = global_magnitude_counts(weights, sparsity, min_keep)
    return [(w.numel() - k) / w.numel() for k, w in zip(keeps, weights)]


def erk(shapes: Sequence[tuple[int, ...]], sparsity: float, dense: Collection[int] = (),
        kind: str = "erk") -> list[float]:
    """§17 Erdős–Rényi(-Kernel) sparsities for weight ``shapes`` ((out, in) or (out, in, kh, kw) ...).

    density p_l = ε·r_l with r_l = Σ dims / Π dims ("erk", every dim, kernels included) or
    (d0 + d1)/(d0·d1) ("er", only n_out and n_in). ε solves Σ p_l n_l = (1 − sparsity)·N over the
    non-dense layers; layers with p_l > 1 become dense and the solve repeats (all at once: ε only
    grows as layers turn dense, so each stays dense). ``dense``: indices forced dense. Real-valued
    (not rounded to counts): Σ (1 − s_l) n_l equals the target up to float error.
    """
    s = check_sparsity(sparsity)
    if kind not in ("erk", "er"):
        raise LowbitError(f"unknown ERK kind {kind!r}; use 'erk' (all dims) or 'er' (n_in and n_out only)")
    if len(shapes) == 0:
        raise LowbitError("no layers given; pass at least one weight shape")
    shapes = [tuple(int(d) for d in sh) for sh in shapes]
    need = 2 if kind == "er" else 1
    bad_shapes = [sh for sh in shapes if len(sh) < need or min(sh, default=0) < 1]
    if bad_shapes:
        raise LowbitError(f"weight shape {bad_shapes[0]} is not allowed for {kind!r}: use {need} or more positive dims")
    bad = [d for d in dense if not isinstance(d, int) or not 0 <= d < len(shapes)]
    if bad:
        raise LowbitError(f"dense index {bad[0]!r} is not a layer index in [0, {len(shapes)})")
    sizes = [math.prod(sh) for sh in shapes]
    raw = [(sum(sh) if kind == "erk" else sh[0] + sh[1]) / (n if kind == "erk" else sh[0] * sh[1])
           for sh, n in zip(shapes, sizes)]
    target, full = (1.0 - s) * sum(sizes), set(dense)
    while True:
        rest = target - sum(sizes[i] for i in full)
        free = [i for i in range(len(shapes)) if i not in full]
        if rest <= 0 and free:
            raise LowbitError(f"the dense layers {sorted(full)} hold {sum(sizes[i] for i in full)} weights, more "
                              f"than the {target:.0f} that sparsity {s} keeps; force fewer layers dense")
        eps = rest / sum(raw[i] * sizes[i] for i in free) if free else 0.0
        over = [i for i in free if eps * raw[i] > 1.0]
        if not over:
            return [0.0 if i in full else 1.0 - eps * raw[i] for i in range(len(shapes))]
        full.update(over)


def lamp_scores(weight: Tensor) -> Tensor:
    """LAMP scores of one layer, float64 of ``weight``'s shape: with the layer's weights sorted by
    |w| ascending (stable), score(u) = w_u² / Σ_{v ≥ u} w_v² (the largest weight scores 1). Scores
    rise along that order, so LAMP prunes each layer by magnitude; only the per-layer amounts differ.
    Where the suffix sum is 0 (a layer's trailing zeros when all are zero) the score is 0."""
    sq = weight.detach().reshape(-1).to(torch.float64).square()
    sorted_sq, order = torch.sort(sq, stable=True)  # (n,) ascending
    suffix = sorted_sq.flip(0).cumsum(0).flip(0)  # Σ_{v >= u}
    score = torch.where(suffix > 0, sorted_sq / suffix.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return torch.empty_like(score).scatter_(0, order, score).reshape(weight.shape)


def lamp(weights: Sequence[Tensor], sparsity: float) -> list[float]:
    """LAMP (Lee et al., ICLR'21): the ``round(sparsity·N)`` lowest LAMP scores over all layers are
    pruned (ties in (layer, index) order). Memory: the scores of every layer, 8 bytes per weight."""
    sizes, s = _check_weights(weights), check_sparsity(sparsity)
    scores = [lamp_scores(w) for w in weights]
    pruned = _threshold_counts(scores, round(s * sum(sizes)), lambda t: t)
    return [p / n for p, n in zip(pruned, sizes)]
