"""Lottery Jackpots: search a sparse mask over the frozen weights of a pretrained model.

Zhang, Lin, … Ji, "Lottery Jackpots Exist in Pre-trained Models", TPAMI 2023 (arXiv 2104.08700).
No weight is ever changed; only which weights are kept:

* the initial mask is one-shot magnitude pruning (``magnitude_masks``): per layer ("uniform") or
  with one threshold over every pruned layer ("global", the paper's ``layerwise l1``); the last
  prunable layer (the classifier) stays dense by default, as in the paper;
* real-valued scores ``m`` start at 1 for kept and 0.99 for pruned weights (``init="magnitude"``);
* the forward pass uses ``W ⊙ b`` with the binary mask ``b``, and the straight-through estimator
  (``mask_ste``) hands ``∂L/∂b`` to ``m``: ``∂L/∂m = ∂L/∂(W ⊙ b) ⊙ W``;
* after each SGD step on ``m``, ShoRE (``shore_swap``) swaps only the indices where the ranking of
  ``m`` disagrees with ``b``: pruned weights scored above the layer's threshold come in, as many kept
  weights scored at or below it go out, so every layer keeps exactly its count.

Defaults from the authors' CIFAR configs: SGD lr 0.1, momentum 0.9, weight decay 5e-4 (on the
scores), cosine schedule over the search epochs. ``init="random"`` (the edge-popup-style control,
scores drawn uniformly in [0.99, 1) and the initial mask their top-k with the same per-layer counts)
is our guess at the paper's random-initialization baseline; with scores in [0, 1) instead, the
search hardly swapped anything (the steps are ~1e-3) and stayed at the random mask's accuracy. Guessed too: the model runs in eval mode
during the search (no batch-norm statistics change), and when ties make the two disagreeing sets
differ in size, the ``min`` of the two sizes is swapped (the authors' code then skips the layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.pruning import small

ALLOCATIONS = ("uniform", "global")
INITS = ("magnitude", "random")


@dataclass(frozen=True)
class JackpotConfig:
    """sparsity: pruned fraction of the searched weights; skip: prunable names left dense (None: the
    last prunable layer, as in the paper). The rest are the search's SGD settings."""

    sparsity: float = 0.9
    allocation: str = "global"
    init: str = "magnitude"
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    skip: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise LowbitError(f"sparsity {self.sparsity} is outside [0, 1)")
        if self.allocation not in ALLOCATIONS:
            raise LowbitError(f"unknown allocation {self.allocation!r}; use one of {', '.join(ALLOCATIONS)}")
        if self.init not in INITS:
            raise LowbitError(f"unknown init {self.init!r}; use one of {', '.join(INITS)}")
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1:
            raise LowbitError(f"epochs >= 0, lr > 0 and batch_size >= 1 needed, got {self.epochs}, {self.lr}, "
                              f"{self.batch_size}")


@dataclass(frozen=True)
class Jackpot:
    masks: dict[str, Tensor]    # name -> bool keep-mask (the weight's shape), searched layers only
    scores: dict[str, Tensor]   # name -> float32 scores at the end of the search
    losses: list[float]         # mean training loss per epoch
    swaps: list[int]            # weights that came in (= went out) per epoch, all layers together


def magnitude_masks(weights: dict[str, Tensor], sparsity: float, allocation: str = "global") -> dict[str, Tensor]:
    """Keep-masks (bool, each weight's shape) that drop ``sparsity`` of the weights by ``|w|``.

    "uniform": every layer drops ``floor(sparsity · numel)``; "global": the ``floor((1 − sparsity) · N)``
    largest ``|w|`` over all layers together are kept. Ties are broken by position (stable sort).
    """
    if allocation not in ALLOCATIONS:
        raise LowbitError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        return {n: _top(w.detach().abs().float(), w.numel() - math.floor(sparsity * w.numel()))
                for n, w in weights.items()}
    flat = torch.cat([w.detach().abs().float().flatten() for w in weights.values()])
    keep = _top(flat, math.floor((1.0 - sparsity) * flat.numel()))
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = keep[start:start + w.numel()].view(w.shape)
        start += w.numel()
    return out


def _top(score: Tensor, k: int) -> Tensor:
    """Bool mask of ``score``'s shape with the k largest entries True (ties: earlier index first)."""
    order = torch.sort(score.flatten(), descending=True, stable=True).indices
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return keep.view(score.shape)


def init_scores(weights: dict[str, Tensor], masks: dict[str, Tensor], init: str = "magnitude",
                seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(scores, binary masks) to start the search from; scores are float32 leaves with gradients.

    "magnitude": 1 where ``masks`` keeps, 0.99 where it prunes, and the binary mask is ``masks``.
    "random": scores uniform in [0.99, 1) (the magnitude init's range, so a gradient step moves the
    ranking as much) and their top-k per layer, k the kept count of ``masks``.
    """
    g = torch.Generator().manual_seed(seed)
    scores, binary = {}, {}
    for n, keep in masks.items():
        if init == "magnitude":
            s, b = torch.where(keep, 1.0, 0.99).float(), keep.clone()
        elif init == "random":
            s = 0.99 + 0.01 * torch.rand(keep.shape, generator=g)
            b = _top(s, int(keep.sum()))
        else:
            raise LowbitError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
        scores[n], binary[n] = s.requires_grad_(True), b
    return scores, binary


class _MaskSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, binary: Tensor) -> Tensor:
        return binary.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def mask_ste(scores: Tensor, binary: Tensor) -> Tensor:
    """The binary mask (as ``scores``' dtype) in the forward; the gradient goes to ``scores`` unchanged."""
    return _MaskSTE.apply(scores, binary)


def shore_swap(scores: Tensor, binary: Tensor) -> tuple[Tensor, int]:
    """ShoRE: (new bool mask, number swapped in) keeping ``binary``'s kept count exactly.

    With ``p`` pruned entries, the threshold ``t`` is the p-th smallest score. Pruned entries with
    score > t come in (highest first) and kept entries with score <= t go out (lowest first), as many
    of each as the smaller of the two sets holds. scores: float tensor; binary: bool, same shape.
    """
    s, b = scores.detach().flatten(), binary.flatten()
    n_pruned = int((~b).sum())
    if n_pruned == 0 or n_pruned == b.numel():
        return binary.clone(), 0
    t = torch.kthvalue(s, n_pruned).values
    come_in = torch.nonzero(~b & (s > t)).flatten()
    go_out = torch.nonzero(b & (s <= t)).flatten()
    n = min(come_in.numel(), go_out.numel())
    new = b.clone()
    if n:
        new[come_in[torch.sort(s[come_in], descending=True, stable=True).indices[:n]]] = True
        new[go_out[torch.sort(s[go_out], stable=True).indices[:n]]] = False
    return new.view_as(binary), n


def search(model: nn.Module, data: small.Split, config: JackpotConfig, seed: int = 0,
           progress: bool = True) -> Jackpot:
    """Search keep-masks for ``model``'s prunable weights (``small.prunable`` minus ``config.skip``).

    The model's parameters and buffers are not modified (masked weights are substituted with
    ``torch.func.functional_call``); it is put in eval mode.
    data: the training split, x as the model expects; the batch order and random scores follow ``seed``.
    """
    weights = {n: w.detach() for n, w in small.prunable(model).items()}
    skip = (list(weights)[-1],) if config.skip is None else config.skip
    unknown = [n for n in skip if n not in weights]
    if unknown:
        raise LowbitError(f"skip names {unknown} are not prunable weights; those are {', '.join(weights)}")
    weights = {n: w for n, w in weights.items() if n not in skip}
    scores, binary = init_scores(weights, magnitude_masks(weights, config.sparsity, config.allocation),
                                 config.init, seed)
    opt = torch.optim.SGD(list(scores.values()), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, config.epochs))
    g = torch.Generator().manual_seed(seed)
    model.eval()
    losses, swaps = [], []
    for _ in tqdm(range(config.epochs), desc="jackpot search", unit="epoch", disable=not progress):
        order = torch.randperm(len(data), generator=g)
        total, swapped = 0.0, 0
        for i in range(0, len(data), config.batch_size):
            idx = order[i:i + config.batch_size]
            masked = {n: weights[n] * mask_ste(scores[n], binary[n]) for n in weights}
            loss = F.cross_entropy(functional_call(model, masked, (data.x[idx],)), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for n in weights:
                binary[n], k = shore_swap(scores[n], binary[n])
                swapped += k
            total += loss.item() * len(idx)
        sched.step()
        losses.append(total / len(data))
        swaps.append(swapped)
    return Jackpot(binary, {n: s.detach() for n, s in scores.items()}, losses, swaps)


def masked_accuracy(model: nn.Module, masks: dict[str, Tensor], data: small.Split, batch_size: int = 1024) -> float:
    """Test accuracy of ``model`` with ``masks`` applied, without modifying the model."""
    params = dict(model.named_parameters())
    masked = {n: params[n].detach() * m.to(params[n].dtype) for n, m in masks.items()}
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            out = functional_call(model, masked, (data.x[i:i + batch_size],))
            right += int((out.argmax(1) == data.y[i:i + batch_size]).sum())
    return right / max(1, len(data))
