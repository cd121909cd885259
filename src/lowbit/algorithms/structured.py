"""Structured pruning math: which input column groups of a linear layer to drop, and the
least-squares refit of the columns that stay.

A layer ``y = W a`` with W (out, n) reads n input columns (an MLP's intermediate channels for
``down_proj``; the concatenated head outputs for ``o_proj``). The columns come in ``groups``, an
int64 tensor (n_groups, group_size) of column indices (one column per MLP channel; all
``heads_per_kv × head_dim`` columns of one KV group for attention). Removing a group deletes
those columns of W (and the rows of the layers that produce them); what the layer loses is
measured under the Gram matrix of its calibration inputs

    G = Σ_tokens a aᵀ              (n, n) float64, a = one token's input column vector.

The output error of a new weight W' (out, |K|) on the kept columns K is
``E(W') = Σ_tokens ||W a − W' a_K||² = tr(D G Dᵀ)`` with ``D = W − W' S`` (S scatters K back to n
columns); ``relative_error`` divides it by ``tr(W G Wᵀ)``, the output energy.

Ridge. Every solve uses ``H = G + λ I`` with ``λ = damp · mean(diag G)`` (``DAMP`` by default;
``λ = damp`` when G is all zero). In the refit this is the penalty ``λ ||W_K − W'||²``: it pulls
the refit towards the weights the columns already have (not towards zero), so ``damp → ∞`` gives
back plain slicing and ``damp = 0`` is ordinary least squares. (A guess of this toolkit, chosen
so that the greedy Hessian selection and the refit minimise the same objective.)

Criteria (score per group; the groups with the lowest scores are removed):

==============  ====================================================================================
``activation``  ``sqrt(tr(W_g G_gg W_gᵀ))``: the norm over all calibration tokens of what the group
                adds to the output; for one channel ``||W[:, c]||₂ · ||a_c||₂``. Chosen once, from
                the scores of the unpruned layer.
``hessian``     OBS for groups (Optimal Brain Surgeon, Hassibi & Stork 1993; the group form as in
                ZipLM, Kurtic, Frantar & Alistarh, arXiv:2302.04089): the output error that removing
                group g adds when all remaining columns are re-fitted, ``tr(W_g [H⁻¹]_gg⁻¹ W_gᵀ)``.
                Greedy: remove the cheapest groups, update W and H⁻¹ by the OBS formulas, rescore,
                repeat; ``ROUNDS`` rounds (one group a round when fewer are removed).
==============  ====================================================================================

Everything is computed in float64; results are float64 (callers cast back). Ties go to the lower
group index (``argmin`` / stable sort).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError

#: Default relative ridge of every solve (``λ = DAMP · mean(diag G)``): the value GPTQ uses for its
#: Hessian; on SmolLM2-135M (bench/structured.py) it is not tuned.
DAMP = 0.01
CRITERIA = ("activation", "hessian")
#: Rounds of the greedy Hessian selection (``hessian_order``).
ROUNDS = 32


def n_removed(n_groups: int, sparsity: float) -> int:
    """How many of ``n_groups`` a ``sparsity`` in [0, 1) removes: ``floor(sparsity · n + 0.5)``
    (nearest, halves up), capped at ``n_groups − 1`` so that one group always stays."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise LowbitError(f"sparsity {sparsity!r} must be a fraction in [0, 1): the share of channels or KV "
                          "groups removed (0.25 removes a quarter)")
    if n_groups < 1:
        raise LowbitError(f"there must be at least one group to prune from, got {n_groups}")
    return min(math.floor(sparsity * n_groups + 0.5), n_groups - 1)


def column_groups(n_cols: int, group_size: int) -> Tensor:
    """(n_cols // group_size, group_size) int64: consecutive column indices, group g = g·size … ."""
    if group_size < 1 or n_cols % group_size:
        raise LowbitError(f"group size {group_size} does not divide the {n_cols} columns")
    return torch.arange(n_cols).reshape(-1, group_size)


def ridge(G: Tensor, damp: float = DAMP) -> Tensor:
    """``H = G + λ I`` (float64) with ``λ = damp · mean(diag G)``, or ``damp`` when diag G is all zero."""
    if not damp >= 0:
        raise LowbitError(f"damp {damp!r} must be >= 0")
    G = G.double()
    scale = float(G.diagonal().mean())
    lam = damp * (scale if scale > 0 else 1.0)
    return G + lam * torch.eye(G.shape[0], dtype=torch.float64, device=G.device)


def activation_scores(W: Tensor, G: Tensor, groups: Tensor) -> Tensor:
    """(n_groups,) float64: ``sqrt(tr(W_g G_gg W_gᵀ))``; W (out, n), G (n, n), groups (n_groups, size)."""
    W, G = W.double(), G.double()
    Wg = W[:, groups].permute(1, 0, 2)  # (n_groups, out, size)
    Gg = G[groups[:, :, None], groups[:, None, :]]  # (n_groups, size, size)
    energy = (Wg @ Gg * Wg).sum((1, 2))
    return energy.clamp_min(0).sqrt()


def _obs_costs(W: Tensor, Hinv: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Per group: the OBS cost ``tr(W_g M_g⁻¹ W_gᵀ)`` with ``M_g = [H⁻¹]_gg``, and ``M_g⁻¹ W_gᵀ``
    (m, size, out)."""
    if groups.shape[1] == 1:  # one column per group: M_g is the scalar [H⁻¹]_cc, no batched solve
        cols = groups[:, 0]
        Y = (W[:, cols] / Hinv.diagonal()[cols]).T[:, None, :]  # (m, 1, out)
        return (W[:, cols].square().sum(0) / Hinv.diagonal()[cols]), Y
    M = Hinv[groups[:, :, None], groups[:, None, :]]  # (m, size, size)
    WgT = W[:, groups].permute(1, 2, 0)  # (m, size, out)
    Y = torch.cholesky_solve(WgT, torch.linalg.cholesky(M))  # (m, size, out) = M⁻¹ W_gᵀ
    return (WgT * Y).sum((1, 2)), Y


def hessian_order(W: Tensor, G: Tensor, groups: Tensor, n_remove: int, damp: float = DAMP,
                  rounds: int = ROUNDS) -> list[int]:
    """Greedy group OBS: the ``n_remove`` group indices in the order they are removed.

    W (out, n) and G (n, n) any float dtype; groups (n_groups, size) int64. Each round scores every
    remaining group by the output error its removal adds when every remaining column is re-fitted,
    under ``H = ridge(G, damp)``, removes the ``ceil(n_remove / rounds)`` cheapest together (their
    columns C), and applies the OBS updates ``W ← W − W_C M⁻¹ [H⁻¹]_{C,:}`` and
    ``H⁻¹ ← H⁻¹ − [H⁻¹]_{:,C} M⁻¹ [H⁻¹]_{C,:}`` with ``M = [H⁻¹]_CC`` (the latter is the inverse of
    H with C's rows and columns deleted, padded with zeros). ``rounds >= n_remove`` is the exact
    one-at-a-time greedy; fewer rounds trade that for speed (1536 channels, 384 removed: 384
    rounds take about 6 s a layer on one core, 32 rounds well under one; a guess of this toolkit).
    """
    if rounds < 1:
        raise LowbitError(f"rounds {rounds} must be >= 1")
    W = W.double().clone()
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(ridge(G, damp)))
    alive = list(range(groups.shape[0]))
    order: list[int] = []
    per_round = -(-n_remove // rounds) if n_remove else 0
    while len(order) < n_remove:
        costs, _ = _obs_costs(W, Hinv, groups[alive])
        take = torch.argsort(costs, stable=True)[:min(per_round, n_remove - len(order))].tolist()
        chosen = [alive[j] for j in take]
        cols = groups[chosen].reshape(-1)
        rows = Hinv[cols, :]  # (|C|, n)
        M = Hinv[cols[:, None], cols[None, :]]  # (|C|, |C|)
        L = torch.linalg.cholesky(M)
        W -= torch.cholesky_solve(W[:, cols].T, L).T @ rows
        Hinv -= rows.T @ torch.cholesky_solve(rows, L)
        order += chosen
        gone = set(chosen)
        alive = [g for g in alive if g not in gone]
    return order


def choose_groups(W: Tensor, G: Tensor, groups: Tensor, n_remove: int, criterion: str,
                  damp: float = DAMP) -> Tensor:
    """(n_groups − n_remove,) int64: the indices of the groups to keep, ascending."""
    if criterion not in CRITERIA:
        raise LowbitError(f"unknown criterion {criterion!r}; structured pruning knows {', '.join(CRITERIA)}")
    n = groups.shape[0]
    if not 0 <= n_remove < n:
        raise LowbitError(f"cannot remove {n_remove} of {n} groups; remove 0 to {n - 1}")
    if criterion == "activation":
        order = torch.argsort(activation_scores(W, G, groups), stable=True)[:n_remove].tolist()
    else:
        order = hessian_order(W, G, groups, n_remove, damp)
    keep = sorted(set(range(n)) - set(order))
    return torch.tensor(keep, dtype=torch.int64)


def refit(W: Tensor, G: Tensor, keep: Tensor, damp: float = DAMP) -> Tensor:
    """(out, |K|) float64: ``argmin_W' E(W') + λ ||W_K − W'||²``, the least-squares new weight on the
    kept columns ``keep`` (int64 column indices). Solves ``W' H_KK = W H_{:,K}`` by Cholesky.

    With ``damp=0`` it is ``torch.linalg.lstsq(A_K, A Wᵀ)`` for the raw inputs A (tokens, n) with
    ``G = AᵀA``; with every column kept it returns W.
    """
    H = ridge(G, damp)
    rhs = H[keep, :] @ W.double().T  # (|K|, out) = H_{K,:} Wᵀ
    return torch.cholesky_solve(rhs, torch.linalg.cholesky(H[keep[:, None], keep[None, :]])).T


def relative_error(W: Tensor, G: Tensor, keep: Tensor, W_new: Tensor) -> float:
    """``tr(D G Dᵀ) / tr(W G Wᵀ)`` with ``D = W − W_new S``: the relative squared output error of using
    W_new (out, |K|) on the kept columns in place of W (out, n); 0.0 when the output energy is 0."""
    W, G = W.double(), G.double()
    D = W.clone()
    D[:, keep] -= W_new.double()
    total = float((W @ G * W).sum())
    return float((D @ G * D).sum()) / total if total > 0 else 0.0
