"""Lottery Jackpots (lowbit.pruning.jackpot): magnitude masks, the STE and ShoRE against obvious
references, and the paper's checks (Zhang et al., TPAMI'23; METHODS.md §14) on a digits MLP
trained here and on ccexam's pretrained MNIST CNN."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.pruning import jackpot, small

torch.set_num_threads(1)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(20, 30, generator=g), "b": torch.randn(8, 4, 3, 3, generator=g)}


def test_uniform_masks_drop_the_smallest_in_each_layer():
    for n, keep in jackpot.magnitude_masks(_weights(), 0.9, "uniform").items():
        w = _weights()[n].abs()
        assert int(keep.sum()) == w.numel() - math.floor(0.9 * w.numel())
        assert w[keep].min() >= w[~keep].max()


def test_global_masks_use_one_threshold_over_all_layers():
    w = _weights()
    masks = jackpot.magnitude_masks(w, 0.8, "global")
    kept = torch.cat([w[n].abs()[masks[n]] for n in w])
    pruned = torch.cat([w[n].abs()[~masks[n]] for n in w])
    assert kept.numel() == math.floor(0.2 * (600 + 288)) and kept.min() >= pruned.max()
    with pytest.raises(LowbitError, match="allocation 'l2'"):
        jackpot.magnitude_masks(w, 0.5, "l2")


def test_magnitude_init_scores_are_one_and_0_99():
    masks = jackpot.magnitude_masks(_weights(), 0.7, "uniform")
    scores, binary = jackpot.init_scores(_weights(), masks, "magnitude")
    for n in masks:
        assert torch.equal(binary[n], masks[n]) and scores[n].requires_grad
        assert torch.equal(scores[n], torch.where(masks[n], 1.0, 0.99))
    _, rnd = jackpot.init_scores(_weights(), masks, "random", seed=3)
    assert all(int(rnd[n].sum()) == int(masks[n].sum()) for n in masks)


def test_ste_forwards_the_binary_mask_and_hands_its_gradient_to_the_scores():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    binary = torch.rand(5, 7, generator=g) > 0.5
    scores = torch.rand(5, 7, generator=g, requires_grad=True)
    (x @ (w * jackpot.mask_ste(scores, binary)).T).square().sum().backward()
    leaf = binary.float().requires_grad_(True)  # reference: the gradient w.r.t. the mask itself
    (x @ (w * leaf).T).square().sum().backward()
    assert torch.equal(jackpot.mask_ste(scores, binary), binary.float())
    assert torch.allclose(scores.grad, leaf.grad) and scores.grad.abs().sum() > 0


def test_shore_is_the_top_k_of_the_scores_when_there_are_no_ties():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores, binary = torch.randn(12, 9, generator=g), torch.rand(12, 9, generator=g) > 0.7
        new, n = jackpot.shore_swap(scores, binary)
        k = int(binary.sum())
        top = torch.zeros(108, dtype=torch.bool)
        top[sorted(range(108), key=lambda i: -float(scores.flatten()[i]))[:k]] = True  # slow reference
        assert torch.equal(new.flatten(), top) and int(new.sum()) == k
        assert n == int((new & ~binary).sum()) == int((binary & ~new).sum())


def test_shore_keeps_the_count_under_ties_and_only_touches_disagreeing_indices():
    scores = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5, 0.2])
    binary = torch.tensor([True, False, True, False, True, False])  # 3 kept; threshold 0.5
    new, n = jackpot.shore_swap(scores, binary)
    assert int(new.sum()) == 3 and n == 1
    assert new[0] and new[1] and not new[5]  # 1.0 comes in, one kept 0.5 goes out, the rest stay
    assert torch.equal(new[[0, 3, 5]], binary[[0, 3, 5]] | torch.tensor([False, False, False]))
    all_kept = torch.ones(6, dtype=torch.bool)
    assert torch.equal(jackpot.shore_swap(scores, all_kept)[0], all_kept)


def _check(model, data, dense: float, cfg: jackpot.JackpotConfig, min_drop: float, max_gap: float) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {n: w.detach() for n, w in small.prunable(model).items()}
    last = list(weights)[-1]
    one_shot = jackpot.magnitude_masks({n: w for n, w in weights.items() if n != last}, cfg.sparsity,
                                       cfg.allocation)
    shot = jackpot.masked_accuracy(model, one_shot, data.test)
    found = jackpot.search(model, data.train, cfg, seed=0, progress=False)
    searched = jackpot.masked_accuracy(model, found.masks, data.test)
    assert dense - shot >= min_drop, (dense, shot)
    assert dense - searched <= max_gap, (dense, searched)
    assert searched > shot
    assert last not in found.masks  # the classifier stays dense
    for n, m in found.masks.items():
        assert int(m.sum()) == int(one_shot[n].sum())  # ShoRE never changes a layer's count
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the weights are bit-identical


def test_jackpot_on_a_digits_mlp_recovers_from_one_shot_magnitude_pruning():
    """§14 on a 64-1024-256-10 MLP (20 Adam epochs; 64-300-100-10 is too small: its jackpot stays
    ~3 points below dense), 90% uniform sparsity, 20 search epochs: one-shot magnitude loses >= 5
    points (measured 98.22 -> 83.52) and the search comes within 1 point of dense (measured 97.33)."""
    data = small.load("digits")
    model = small.mlp([64, 1024, 256, 10], seed=0)
    small.train(model, data.train, epochs=20, seed=0)
    cfg = jackpot.JackpotConfig(sparsity=0.9, allocation="uniform", epochs=20, batch_size=64)
    _check(model, data, small.accuracy(model, data.test), cfg, min_drop=0.05, max_gap=0.01)


def test_jackpot_on_the_pretrained_mnist_cnn():
    """§14 on ccexam's CNN (99.68% on the MNIST-5k test split), 90% sparsity with the paper's global
    ("layerwise l1") allocation, searched on the first 2,500 train images for 2 epochs (measured 98.88), scored on the
    test split. Asserts a one-shot drop >= 3 points, NOT the paper's 5: measured 99.68 -> 95.92, so
    the >= 5 claim fails for this model at 90% global (uniform 90% drops to 16.6%, see the bench);
    and a search within 1 point of dense (full train split: 98.32 after 1 epoch, 98.96 after 3)."""
    data = small.load("mnist5k", images=True)
    part = small.Data(small.Split(data.train.x[:2500], data.train.y[:2500]), data.test)
    model = small.pretrained_mnist_cnn()
    cfg = jackpot.JackpotConfig(sparsity=0.9, allocation="global", epochs=2)
    _check(model, part, small.accuracy(model, data.test), cfg, min_drop=0.03, max_gap=0.01)
