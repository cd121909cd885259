"""Iterative magnitude pruning with rewinding: the Lottery Ticket Hypothesis.

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks",
ICLR 2019 (arXiv 1803.03635); rewinding to iteration k > 0 ("late resetting") is from Frankle et
al., "Stabilizing the Lottery Ticket Hypothesis" (arXiv 1903.01611).

One round of IMP (``imp``):

1. train the masked network from the rewind point ``θ_k`` (``θ_0`` when ``rewind_step = 0``);
2. in every prunable layer, drop the fraction ``rate`` of its *remaining* weights with the smallest
   ``|w|`` (layer-wise, as in the paper; the output layer at ``output_rate``, by default half of
   ``rate``: 20% and 10% per round for LeNet-300-100);
3. reset the survivors to ``θ_k`` and go on. After ``n`` rounds a hidden layer keeps ``(1 − rate)^n``.

Controls (``retrain``): the same mask with a fresh random initialization (``reinit_seed``), and a
random mask with the ticket's per-layer counts (``random_masks``).

What is guessed (not fixed by the paper for this setting): the digits training recipe (Adam, the
epochs and learning rate of ``TrainRecipe``), that biases are never pruned and are rewound with the
weights, and that accuracy is read at the end of training (no early-stopping selection).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.pruning import small


@dataclass(frozen=True)
class TrainRecipe:
    """How each round trains (``small.train``'s arguments). Defaults tuned on digits (guessed)."""

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise LowbitError(f"epochs, lr and batch_size must be positive, got {self.epochs}, {self.lr}, "
                              f"{self.batch_size}")


@dataclass(frozen=True)
class LotteryConfig:
    """rounds: pruning rounds; rate: fraction of the remaining weights dropped per round in every layer
    but the output one, which drops ``output_rate`` (None: ``rate / 2``); rewind_step: 0 rewinds to
    the initialization, k > 0 to the weights after k optimizer steps of the first (dense) training."""

    rounds: int = 10
    rate: float = 0.2
    output_rate: float | None = None
    rewind_step: int = 0
    train: TrainRecipe = field(default_factory=TrainRecipe)

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise LowbitError(f"rounds must be >= 0, got {self.rounds}")
        for name, r in (("rate", self.rate), ("output_rate", self.output_rate)):
            if r is not None and not 0.0 <= r < 1.0:
                raise LowbitError(f"{name} {r} is outside [0, 1)")
        if self.rewind_step < 0:
            raise LowbitError(f"rewind_step must be >= 0, got {self.rewind_step}")

    def rates(self, names: list[str]) -> dict[str, float]:
        """Per-layer pruning rate: ``rate`` for all but the last name, ``output_rate`` for the last."""
        out = self.rate / 2 if self.output_rate is None else self.output_rate
        return {n: (out if i == len(names) - 1 else self.rate) for i, n in enumerate(names)}


@dataclass(frozen=True)
class Round:
    """One trained network of the IMP sequence: round 0 is the dense one."""

    round: int
    remaining: float            # kept fraction of the prunable weights
    accuracy: float             # test accuracy after training, in [0, 1]
    masks: dict[str, Tensor]    # name -> bool keep-mask (the weight's shape)


@dataclass(frozen=True)
class Ticket:
    rounds: list[Round]
    rewind: dict[str, Tensor]   # the state dict the survivors are reset to (θ_0 or θ_k)


def prune_step(weights: dict[str, Tensor], masks: dict[str, Tensor], rates: dict[str, float]) -> dict[str, Tensor]:
    """New keep-masks: in each layer drop ``floor(rates[name] · remaining)`` of the kept weights with the
    smallest ``|w|`` (ties broken by index, so the result is deterministic).

    weights: name -> float tensor (any shape); masks: name -> bool tensor of the same shape;
    rates: name -> fraction in [0, 1). Returns name -> bool tensor; the inputs are not changed.
    """
    new = {}
    for name, w in weights.items():
        keep = masks[name]
        n_drop = math.floor(rates[name] * int(keep.sum()))
        score = torch.where(keep, w.detach().abs(), torch.full_like(w, float("inf"), dtype=torch.float32))
        order = torch.sort(score.flatten(), stable=True).indices  # pruned (inf) sort last
        flat = keep.flatten().clone()
        flat[order[:n_drop]] = False
        new[name] = flat.view_as(keep)
    return new


def remaining(masks: dict[str, Tensor]) -> float:
    """Kept fraction over all masks together."""
    return sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values()))


def random_masks(masks: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Random keep-masks with exactly the per-layer kept counts of ``masks`` (the random-mask control)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in masks.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[:int(m.sum())]] = True
        out[name] = flat.view_as(m)
    return out


def _train_capturing(model: nn.Module, data: small.Split, recipe: TrainRecipe, seed: int,
                     masks: dict[str, Tensor] | None, step: int) -> dict[str, Tensor] | None:
    """``small.train`` that also returns the state dict after ``step`` optimizer steps (None for 0).

    Each training step runs exactly one forward in train mode, so the state at the start of forward
    number ``step`` (counting from 0) is the state after ``step`` optimizer steps.
    """
    seen, captured = [0], {}

    def hook(module: nn.Module, args) -> None:
        if module.training and seen[0] == step and step > 0:
            captured.update({k: v.detach().clone() for k, v in module.state_dict().items()})
        seen[0] += module.training

    handle = model.register_forward_pre_hook(hook)
    try:
        small.train(model, data, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                    optimizer=recipe.optimizer, masks=masks, seed=seed)
    finally:
        handle.remove()
    if step > 0 and not captured:
        raise LowbitError(f"rewind_step {step} is past the end of training ({seen[0]} steps)")
    return captured or None


def imp(make_model: Callable[[int], nn.Module], data: small.Data, config: LotteryConfig, seed: int = 0,
        progress: bool = True) -> Ticket:
    """Run IMP: a dense training, then ``config.rounds`` rounds of prune → rewind → retrain.

    make_model(seed) -> a fresh nn.Module (e.g. ``lambda s: small.mlp([64, 300, 100, 10], s)``); its
    Linear/Conv2d weights (``small.prunable``) are pruned. Training seed: ``seed`` for every round
    (same batch order), so rounds differ only by their masks. Returns every round's masks and accuracy.
    """
    model = make_model(seed)
    theta0 = copy.deepcopy(model.state_dict())
    names = list(small.prunable(model))
    rates = config.rates(names)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in small.prunable(model).items()}
    rewind = _train_capturing(model, data.train, config.train, seed, None, config.rewind_step) or theta0
    rounds = [Round(0, 1.0, small.accuracy(model, data.test), masks)]
    for r in tqdm(range(1, config.rounds + 1), desc="IMP", unit="round", disable=not progress):
        masks = prune_step({n: w.detach() for n, w in small.prunable(model).items()}, masks, rates)
        model.load_state_dict(rewind)
        small.train(model, data.train, epochs=config.train.epochs, lr=config.train.lr,
                    batch_size=config.train.batch_size, optimizer=config.train.optimizer, masks=masks, seed=seed)
        rounds.append(Round(r, remaining(masks), small.accuracy(model, data.test), masks))
    return Ticket(rounds, rewind)


def retrain(make_model: Callable[[int], nn.Module], data: small.Data, masks: dict[str, Tensor],
            recipe: TrainRecipe, *, init: dict[str, Tensor] | None = None, init_seed: int = 0,
            seed: int = 0) -> float:
    """Train a masked network and return its test accuracy.

    init: a state dict to start from (the ticket's rewind point); None draws a fresh initialization
    with ``make_model(init_seed)`` (the random re-initialization control). seed: the batch order.
    """
    model = make_model(init_seed)
    if init is not None:
        model.load_state_dict(init)
    small.train(model, data.train, epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                optimizer=recipe.optimizer, masks=masks, seed=seed)
    return small.accuracy(model, data.test)
