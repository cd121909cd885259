"""MetaAug's pure parts (lowbit.algorithms.metaaug) against independent references: T starts at
the identity exactly, the hand-unrolled hypergradient matches central finite differences in
float64, PKT and KL match slow loops, mixup's λ is Beta(4, 4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.algorithms.adaround import rectified_sigmoid, regularizer
from lowbit.algorithms.metaaug import (init_transform, kl_distance, margin_penalty, meta_gradient, mixup,
                                       mixup_draw, pkt, relative_change, transform, unrolled_step)


@pytest.mark.parametrize("shape,dtype", [((3, 5, 16), torch.float32), ((7, 16), torch.float32),
                                         ((2, 4, 16), torch.bfloat16)])
def test_transform_starts_at_the_identity_exactly(shape, dtype):
    theta = init_transform(16, 8, torch.Generator().manual_seed(0))
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 30).to(dtype)
    assert torch.equal(transform(x, theta), x) and transform(x, theta).dtype == dtype
    assert [t.shape for t in theta] == [(8, 16), (8,), (16, 8), (16,)]
    assert margin_penalty(transform(x, theta), x, 0.1) == pytest.approx(0.1)


def test_transform_is_the_residual_mlp_and_seeded():
    a = init_transform(6, 4, torch.Generator().manual_seed(3))
    b = init_transform(6, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    theta = [a[0], a[1], torch.randn(6, 4), torch.randn(6)]
    x = torch.randn(5, 6)
    ref = torch.stack([r + theta[2] @ torch.clamp(theta[0] @ r + theta[1], min=0) + theta[3] for r in x])
    assert torch.allclose(transform(x, theta), ref, atol=1e-6)


def test_margin_is_zero_once_the_change_reaches_tau():
    x = torch.ones(4, 8)
    assert relative_change(x * 1.5, x) == pytest.approx(0.25)
    assert margin_penalty(x * 1.5, x, 0.1) == 0 and margin_penalty(x * 1.1, x, 0.1) == pytest.approx(0.09)


def _tiny_problem():
    """A soft-rounded Linear (8 -> 3) + ReLU + Linear (3 -> 4) in float64, T on 8 features."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 8, generator=g, dtype=torch.float64)
    lo = torch.floor(W * 4) / 4
    hi = lo + 0.25
    W2 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.randn(6, 8, generator=g, dtype=torch.float64)
    theta = [t.to(torch.float64) for t in init_transform(8, 5, g)]
    theta[2] = torch.randn(8, 5, generator=g, dtype=torch.float64) * 0.3  # off the identity
    theta[3] = torch.randn(8, generator=g, dtype=torch.float64) * 0.1
    V = torch.randn(3, 8, generator=g, dtype=torch.float64) * 0.5

    def block(h, Wq):
        return F.linear(F.relu(F.linear(h, Wq)), W2)

    def losses(th, Vleaf):
        aug = transform(x, th)
        target = block(aug, W)

        def inner(Vs):
            h = rectified_sigmoid(Vs[0])
            return (block(aug, lo + h * (hi - lo)) - target).pow(2).sum(-1).mean() + 0.01 * regularizer(h, 4.0)

        def outer(Vs):
            out = block(x, lo + rectified_sigmoid(Vs[0]) * (hi - lo))
            return 5 * kl_distance(out, block(x, W)) + 0.5 * margin_penalty(aug, x, 10.0) + 300 * pkt(
                block(mixup(aug, 0.7, torch.arange(6).roll(1)), W), block(mixup(x, 0.7, torch.arange(6).roll(1)), W))

        return inner, outer

    return theta, V, losses


def test_unrolled_hypergradient_matches_central_finite_differences():
    theta, V0, losses = _tiny_problem()
    lr = 0.05
    th = [t.clone().requires_grad_() for t in theta]
    V = V0.clone().requires_grad_()
    inner, outer = losses(th, V)
    grads, value = meta_gradient(inner, outer, [V], th, lr)
    # the step's scale 1/rms(g) is a constant of the step: read it at θ₀, keep it fixed below
    Vr = V0.clone().requires_grad_()
    rms = torch.autograd.grad(losses(theta, Vr)[0]([Vr]), [Vr])[0].pow(2).mean().sqrt()

    def F_of(th_values):
        Vl = V0.clone().requires_grad_()
        inner_l, outer_l = losses(th_values, Vl)
        g = torch.autograd.grad(inner_l([Vl]), [Vl])[0]
        with torch.no_grad():
            return float(outer_l([V0 - lr * g / rms]))

    assert value == pytest.approx(F_of(theta), rel=1e-12)
    eps = 1e-6
    picks = torch.Generator().manual_seed(5)
    for k, t in enumerate(theta):
        for idx in torch.randint(0, t.numel(), (4,), generator=picks).tolist():
            plus = [p.clone() for p in theta]
            minus = [p.clone() for p in theta]
            plus[k].view(-1)[idx] += eps
            minus[k].view(-1)[idx] -= eps
            fd = (F_of(plus) - F_of(minus)) / (2 * eps)
            assert grads[k].view(-1)[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9), (k, idx)
    assert any(float(g.abs().max()) > 1e-4 for g in grads)  # the check is not vacuous


def test_unrolled_step_moves_v_by_lr_on_average():
    V = torch.randn(50, 20, dtype=torch.float64, requires_grad=True)
    loss = (V.pow(3) * torch.linspace(0, 1, 20, dtype=torch.float64)).sum()
    updated, (g,) = unrolled_step(loss, [V], 1e-3)
    step = (V - updated[0]).detach()
    assert step.pow(2).mean().sqrt().item() == pytest.approx(1e-3, rel=1e-9)
    assert torch.allclose(step, 1e-3 * g.detach() / g.detach().pow(2).mean().sqrt())
    assert updated[0].requires_grad and g.requires_grad  # the graph is kept for the outer gradient


def test_pkt_matches_a_slow_loop_and_vanishes_on_equal_features():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)

    def dist(f):
        sim = [[(F.cosine_similarity(f[i], f[j], dim=0, eps=0).item() + 1) / 2 for j in range(5)] for i in range(5)]
        return [[v / sum(row) for v in row] for row in sim]

    ps, pt = dist(s), dist(t)
    ref = sum(pt[i][j] * math.log((pt[i][j] + 1e-7) / (ps[i][j] + 1e-7)) for i in range(5) for j in range(5)) / 25
    assert pkt(s, t).item() == pytest.approx(ref, rel=1e-4)
    assert pkt(t, t).item() == pytest.approx(0.0, abs=1e-7) and pkt(s, t) > 0
    assert pkt(torch.randn(3, 400, 7), torch.randn(3, 400, 7)).isfinite()  # 1200 rows, strided to <= 512


def test_kl_distance_matches_the_definition():
    out, target = torch.randn(4, 10), torch.randn(4, 10)
    p, q = F.softmax(target / 4, -1), F.softmax(out / 4, -1)
    assert kl_distance(out, target).item() == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-5)


def test_mixup_lambda_is_beta_4_4_folded_and_seeded():
    g = torch.Generator().manual_seed(0)
    draws = [mixup_draw(6, g) for _ in range(4000)]
    lams = torch.tensor([lam for lam, _ in draws], dtype=torch.float64)
    assert bool((lams >= 0.5).all() and (lams <= 1).all())
    # E|λ − 1/2| for λ ~ Beta(4, 4): 35/256 (from the density 140·λ³(1 − λ)³)
    assert float((lams - 0.5).mean()) == pytest.approx(35 / 256, abs=0.006)
    again = mixup_draw(6, torch.Generator().manual_seed(0))
    assert again[0] == draws[0][0] and torch.equal(again[1], draws[0][1])
    x = torch.arange(6.0)
    assert torch.equal(mixup(x, 1.0, torch.arange(6).flip(0)), x)
