"""Lottery tickets (lowbit.pruning.lottery): the pieces against obvious references, and the
paper's check (Frankle & Carbin, ICLR'19; METHODS.md §13) on a digits LeNet-300-100, one seed."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.pruning import lottery, small

torch.set_num_threads(1)


def _slow_prune(w: torch.Tensor, keep: torch.Tensor, rate: float) -> torch.Tensor:
    """Drop floor(rate * kept) kept entries, smallest |w| first, ties by index: a plain loop."""
    kept = [(abs(float(v)), i) for i, (v, k) in enumerate(zip(w.flatten(), keep.flatten())) if k]
    out = keep.flatten().clone()
    for _, i in sorted(kept)[:math.floor(rate * len(kept))]:
        out[i] = False
    return out.view_as(keep)


def test_prune_step_matches_a_loop_and_never_revives():
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(30, 20, generator=g), "b": torch.randn(10, 30, generator=g)}
    masks = {"a": torch.rand(30, 20, generator=g) > 0.3, "b": torch.ones(10, 30, dtype=torch.bool)}
    w["a"][0, :5] = 0.5  # ties
    rates = {"a": 0.2, "b": 0.1}
    new = lottery.prune_step(w, masks, rates)
    for n in w:
        assert torch.equal(new[n], _slow_prune(w[n], masks[n], rates[n]))
        assert not (new[n] & ~masks[n]).any()
        assert int(new[n].sum()) == int(masks[n].sum()) - math.floor(rates[n] * int(masks[n].sum()))


def test_output_layer_is_pruned_at_half_the_rate_and_ten_rounds_leave_about_10_7_percent():
    cfg = lottery.LotteryConfig(rounds=10, rate=0.2)
    assert cfg.rates(["x", "y", "out"]) == {"x": 0.2, "y": 0.2, "out": 0.1}
    model = small.mlp([64, 300, 100, 10])
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in small.prunable(model).items()}
    for _ in range(10):
        masks = lottery.prune_step({n: w.detach() for n, w in small.prunable(model).items()}, masks,
                                   cfg.rates(list(masks)))
    hidden = sum(int(masks[n].sum()) for n in list(masks)[:2]) / (64 * 300 + 300 * 100)
    assert abs(hidden - 0.8 ** 10) < 2e-3
    assert abs(int(masks[list(masks)[-1]].sum()) / 1000 - 0.9 ** 10) < 3e-3
    assert 0.105 < lottery.remaining(masks) < 0.115


def test_random_masks_keep_each_layers_count_and_follow_the_seed():
    masks = {"a": torch.rand(40, 40, generator=torch.Generator().manual_seed(1)) > 0.8}
    r1, r2, r3 = (lottery.random_masks(masks, s) for s in (0, 0, 1))
    assert int(r1["a"].sum()) == int(masks["a"].sum())
    assert torch.equal(r1["a"], r2["a"]) and not torch.equal(r1["a"], r3["a"])


def test_rewind_to_step_k_is_the_state_after_k_steps():
    """With full-batch steps, training for k epochs is k steps: its state must equal the one the
    rewinding hook captures at step k of a longer run (same seed, same Adam state)."""
    data = small.load("digits").train
    recipe = lottery.TrainRecipe(epochs=3, batch_size=len(data))
    ref = small.mlp([64, 32, 10], seed=5)
    small.train(ref, data, epochs=3, batch_size=len(data), seed=7)
    captured = lottery._train_capturing(small.mlp([64, 32, 10], seed=5), data,
                                        lottery.TrainRecipe(epochs=6, batch_size=len(data)), 7, None, 3)
    for k, v in ref.state_dict().items():
        assert torch.equal(captured[k], v), k
    with pytest.raises(LowbitError, match="past the end"):
        lottery._train_capturing(small.mlp([64, 32, 10]), data, recipe, 0, None, 10)


def test_bad_config_values_are_named():
    with pytest.raises(LowbitError, match="rate 1.5"):
        lottery.LotteryConfig(rate=1.5)
    with pytest.raises(LowbitError, match="rewind_step"):
        lottery.LotteryConfig(rewind_step=-1)


def test_lottery_ticket_claims_on_digits_lenet_300_100():
    """§13, seed 0, 20 Adam epochs per round: at 10.7-11.2% remaining (10 rounds of 20%, output 10%)
    the rewound ticket is within 1 point of dense; at ~4.8% (14 rounds) the same mask re-initialized
    is at least 2 points worse than the ticket. Measured (seed 0): dense 97.77, round 10 97.10,
    round 14 ticket 94.88 vs re-init 90.20. bench/pruning_training.py runs 3 seeds."""
    data = small.load("digits")
    make = lambda s: small.mlp([64, 300, 100, 10], s)  # noqa: E731
    cfg = lottery.LotteryConfig(rounds=14, train=lottery.TrainRecipe(epochs=20))
    ticket = lottery.imp(make, data, cfg, seed=0, progress=False)
    dense, r10, r14 = ticket.rounds[0], ticket.rounds[10], ticket.rounds[14]
    assert 0.10 < r10.remaining < 0.115 and 0.04 < r14.remaining < 0.055
    assert dense.accuracy - r10.accuracy <= 0.01
    reinit = lottery.retrain(make, data, r14.masks, cfg.train, init_seed=100, seed=0)
    assert r14.accuracy - reinit >= 0.02, (r14.accuracy, reinit)
    again = lottery.retrain(make, data, r14.masks, cfg.train, init=ticket.rewind, seed=0)
    assert again == r14.accuracy  # rewinding is deterministic: the ticket retrains to the same accuracy
