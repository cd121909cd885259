"""rd_curves and masks against a plain copy-and-zero reference; exact counts and determinism."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.pruning import rd_curves as R
from lowbit.pruning.masks import density, magnitude_masks, random_masks
from lowbit.pruning.small import apply_masks, cnn, mlp, prunable


def _slow_curve_point(model, x, name, amount):
    """deepcopy, zero round-half-up(amount·n) smallest |w| of one layer in place, sum of squares / N."""
    ref = model(x).detach().double()
    m = copy.deepcopy(model)
    w = dict(m.named_parameters())[name]
    n = w.numel()
    k = int(amount * n + 0.5)
    flat = w.detach().reshape(-1)
    order = sorted(range(n), key=lambda i: (abs(float(flat[i])), i))[:k]
    with torch.no_grad():
        w.view(-1)[torch.tensor(order, dtype=torch.long)] = 0.0
    return float(((m(x).detach().double() - ref) ** 2).sum() / len(x))


@pytest.mark.parametrize("make", [lambda: mlp([64, 16, 12, 10], seed=1), lambda: cnn((4, 6), seed=1)])
def test_layer_curves_match_copy_and_zero(make):
    model = make().eval()
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    curves = R.layer_curves(model, x, steps=4)
    assert list(curves) == list(prunable(model))
    for name, c in curves.items():
        assert c.shape == (5,) and c[0] == 0.0
        for j in (1, 3, 4):
            assert float(c[j]) == pytest.approx(_slow_curve_point(model, x, name, j / 4), rel=1e-5, abs=1e-9)


def test_joint_distortion_equals_pruning_the_model():
    model = mlp([64, 16, 10], seed=2).eval()
    x = torch.rand(30, 64, generator=torch.Generator().manual_seed(1))
    sp = [0.5, 0.3]
    ref = model(x).detach()
    pruned = copy.deepcopy(model)
    apply_masks(pruned, magnitude_masks(prunable(pruned), sp))
    want = float(((pruned(x).detach().double() - ref.double()) ** 2).sum(1).mean())
    assert R.joint_distortion(model, x, sp) == pytest.approx(want, rel=1e-12)
    assert torch.equal(model(x), ref)  # the model itself is untouched
    with pytest.raises(LowbitError, match="steps"):
        R.layer_curves(model, x, steps=0)


def test_masks_counts_threshold_and_determinism():
    ws = prunable(mlp([64, 33, 10], seed=3))
    sp = [0.37, 0.9]
    for masks in (magnitude_masks(ws, sp), random_masks(ws, sp, seed=5)):
        assert [int((~m).sum()) for m in masks.values()] == [round(s * w.numel()) for s, w in zip(sp, ws.values())]
    mm = magnitude_masks(ws, sp)
    for w, m in zip(ws.values(), mm.values()):
        assert w[m].abs().min() >= w[~m].abs().max()
    a, b, c = random_masks(ws, sp, seed=5), random_masks(ws, sp, seed=5), random_masks(ws, sp, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert density(a) == pytest.approx(1 - (round(0.37 * 64 * 33) + 297) / (64 * 33 + 330))
    with pytest.raises(LowbitError, match="one per layer"):
        magnitude_masks(ws, [0.5])
    with pytest.raises(LowbitError, match="outside"):
        random_masks(ws, [0.5, 1.5])
