"""lowbit.algorithms.allocation against slow, independent references and exact properties."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from lowbit.algorithms import allocation as A
from lowbit.algorithms.rd_allocation import grid_pruned, rate_distortion_amounts
from lowbit.errors import LowbitError


def _layers(seed: int, shapes, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct magnitudes: many exact ties across and within layers
        return [torch.randint(-3, 4, sh, generator=g).float() for sh in shapes]
    return [torch.randn(sh, generator=g) * (1 + i) for i, sh in enumerate(shapes)]


def _pruned_by_reference(scores, k):
    """Concatenate, stable-sort (ties in (layer, index) order), prune the first k, count per layer."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    gone = owner[torch.sort(flat, stable=True).indices[:k]]
    return torch.bincount(gone, minlength=len(scores)).tolist()


SHAPES = [(7, 5), (16, 3, 3, 3), (40,), (3, 11)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.77, 0.999])
@pytest.mark.parametrize("gather", [1 << 22, 5])  # 5: forces the bisection passes
def test_global_magnitude_matches_concatenate_and_sort(monkeypatch, ties, sparsity, gather):
    monkeypatch.setattr(A, "_GATHER", gather)
    ws = _layers(1, SHAPES, ties)
    n = sum(w.numel() for w in ws)
    k = round(sparsity * n)
    ref = _pruned_by_reference([w.abs() for w in ws], k)
    if k:  # the k-th smallest is also torch.kthvalue's
        t = torch.cat([w.abs().reshape(-1) for w in ws]).kthvalue(k).values.item()
        assert A._kth_smallest(ws, k, A._magnitude) == t
    got = A.global_magnitude_counts(ws, sparsity)
    assert got == [w.numel() - r for w, r in zip(ws, ref)]
    assert A.global_magnitude(ws, sparsity) == pytest.approx([r / w.numel() for w, r in zip(ws, ref)], abs=0)


def test_many_equal_values_stop_the_bisection_without_gathering(monkeypatch):
    monkeypatch.setattr(A, "_GATHER", 3)
    ws = [torch.zeros(50), torch.cat([torch.zeros(30), torch.arange(1.0, 11.0)])]
    assert A._kth_smallest(ws, 70, A._magnitude) == 0.0 and A._kth_smallest(ws, 81, A._magnitude) == 1.0
    assert A.global_magnitude_counts(ws, 0.8) == [0, 18]  # 72 pruned: 80 zeros in order, then none


def test_global_magnitude_bfloat16_and_keep_largest_agree():
    ws = [w.to(torch.bfloat16) for w in _layers(2, SHAPES, ties=True)]
    keeps = A.global_magnitude_counts(ws, 0.6)
    masks = [A.keep_largest(w.abs(), k) for w, k in zip(ws, keeps)]
    ref = _pruned_by_reference([w.abs().float() for w in ws], round(0.6 * sum(w.numel() for w in ws)))
    assert [int((~m).sum()) for m in masks] == ref
    kept = torch.cat([w[m].abs().float() for w, m in zip(ws, masks)])
    dropped = torch.cat([w[~m].abs().float() for w, m in zip(ws, masks)])
    assert kept.min() >= dropped.max()  # one global threshold


def _mt_reference(ws, sparsity, mins):
    """Independent formulation: each layer's min largest weights are forced in, then the rest of the
    budget goes to the globally largest of the remaining weights."""
    n = sum(w.numel() for w in ws)
    budget = n - round(sparsity * n)
    rest, owner = [], []
    for i, (w, m) in enumerate(zip(ws, mins)):
        v = torch.sort(w.abs().reshape(-1), descending=True).values
        rest.append(v[min(m, v.numel()):])
        owner += [i] * (v.numel() - min(m, v.numel()))
    extra = budget - sum(min(m, w.numel()) for w, m in zip(ws, mins))
    top = torch.sort(torch.cat(rest), descending=True).indices[:extra]
    counts = torch.bincount(torch.tensor(owner)[top], minlength=len(ws)).tolist()
    return [min(m, w.numel()) + c for w, m, c in zip(ws, mins, counts)]


@pytest.mark.parametrize("seed", range(4))
def test_minimum_threshold_matches_reference(seed):
    shapes = [(64, 32), (512,), (10, 20), (5,), (30, 30)]
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(sh, generator=g) * s for sh, s in zip(shapes, [1.0, 3.0, 0.05, 0.01, 0.5])]
    mins = [20, 10, 15, 8, 9]  # the 5-weight layer is smaller than its minimum: kept whole
    plain = A.global_magnitude_counts(ws, 0.9)
    assert plain[2] < 15 and plain[3] == 0  # the minimum matters here
    got = A.global_magnitude_counts(ws, 0.9, mins)
    assert got == _mt_reference(ws, 0.9, mins)
    assert sum(got) == sum(w.numel() for w in ws) - round(0.9 * sum(w.numel() for w in ws))
    assert all(k >= min(m, w.numel()) for k, m, w in zip(got, mins, ws)) and got[3] == 5


def test_global_magnitude_errors():
    ws = _layers(0, SHAPES)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(LowbitError, match="outside"):
            A.global_magnitude(ws, bad)
    with pytest.raises(LowbitError, match="no layers"):
        A.global_magnitude([], 0.5)
    with pytest.raises(LowbitError, match="minimum keeps"):
        A.global_magnitude(ws, 0.99, min_keep=30)
    with pytest.raises(LowbitError, match="entries"):
        A.global_magnitude(ws, 0.5, min_keep=[1, 2])
    with pytest.raises(LowbitError, match="non-negative"):
        A.global_magnitude(ws, 0.5, min_keep=-1)
    with pytest.raises(LowbitError, match="finite"):
        A.global_magnitude([torch.tensor([1.0, float("nan")])], 0.5)
    with pytest.raises(LowbitError, match="cannot keep"):
        A.keep_largest(torch.ones(3), 4)


def test_uniform():
    assert A.uniform([10, 20, 5], 0.25) == [0.25, 0.25, 0.25]
    with pytest.raises(LowbitError, match="positive integers"):
        A.uniform([10, 0], 0.5)
    with pytest.raises(LowbitError, match="no layers"):
        A.uniform([], 0.5)


def _erk_reference(shapes, sparsity, dense, kind):
    """Water-filling by bisection on ε: densities min(1, ε·r_l) (forced-dense = 1) keep the target."""
    n = [math.prod(s) for s in shapes]
    r = [sum(s) / math.prod(s) if kind == "erk" else (s[0] + s[1]) / (s[0] * s[1]) for s in shapes]

    def kept(eps):
        return sum(nl if i in dense else min(1.0, eps * rl) * nl for i, (nl, rl) in enumerate(zip(n, r)))
    lo, hi = 0.0, 1e9
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < (1 - sparsity) * sum(n) else (lo, mid)
    return [0.0 if i in dense else 1 - min(1.0, hi * rl) for i, rl in enumerate(r)]


@pytest.mark.parametrize("kind", ["erk", "er"])
@pytest.mark.parametrize("dense", [(), (0,)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_erk_against_water_filling(kind, dense, sparsity):
    shapes = [(16, 1, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64)]
    got = A.erk(shapes, sparsity, dense=dense, kind=kind)
    n = [math.prod(s) for s in shapes]
    assert sum((1 - s) * nl for s, nl in zip(got, n)) == pytest.approx((1 - sparsity) * sum(n), rel=1e-9)
    assert all(0.0 <= s < 1.0 or s == 0.0 for s in got) and all(1 - s <= 1.0 for s in got)
    assert got == pytest.approx(_erk_reference(shapes, sparsity, set(dense), kind), abs=1e-9)
    if sparsity == 0.5:  # the small first conv saturates and becomes dense
        assert got[0] == 0.0


def test_erk_errors():
    with pytest.raises(LowbitError, match="unknown ERK kind"):
        A.erk([(4, 4)], 0.5, kind="snip")
    with pytest.raises(LowbitError, match="dense layers"):
        A.erk([(100, 100), (10, 10)], 0.9, dense=[0])
    with pytest.raises(LowbitError, match="not a layer index"):
        A.erk([(4, 4)], 0.5, dense=[3])
    with pytest.raises(LowbitError, match="not allowed"):
        A.erk([(4,)], 0.5, kind="er")
    with pytest.raises(LowbitError, match="no layers"):
        A.erk([], 0.5)
    with pytest.raises(LowbitError, match="outside"):
        A.erk([(4, 4)], 1.0)


def _lamp_slow(w):
    v = [float(x) for x in w.reshape(-1)]
    order = sorted(range(len(v)), key=lambda i: (abs(v[i]), i))
    out = [0.0] * len(v)
    for pos, u in enumerate(order):
        den = sum(v[q] ** 2 for q in order[pos:])
        out[u] = v[u] ** 2 / den if den > 0 else 0.0
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


@pytest.mark.parametrize("sparsity", [0.2, 0.8, 0.95])
def test_lamp_against_slow_loop(sparsity):
    ws = _layers(3, [(6, 5), (4, 2, 2, 2), (20,)])
    scores = [_lamp_slow(w) for w in ws]
    for w, s in zip(ws, scores):
        torch.testing.assert_close(A.lamp_scores(w), s, rtol=1e-12, atol=0)
        assert s.max().item() == pytest.approx(1.0)
    ref = _pruned_by_reference(scores, round(sparsity * sum(w.numel() for w in ws)))
    assert A.lamp(ws, sparsity) == [r / w.numel() for r, w in zip(ref, ws)]


def test_lamp_zero_layer_and_errors():
    assert A.lamp_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(LowbitError, match="outside"):
        A.lamp([torch.ones(4)], -0.5)
    with pytest.raises(LowbitError, match="no layers"):
        A.lamp([], 0.5)


def _rd_brute(curves, sizes, sparsity, slack=0):
    n = sum(sizes)
    budget = n - round(sparsity * n) - slack
    best = None
    for js in itertools.product(*[range(c.numel()) for c in curves]):
        kept = sum(s - grid_pruned(s, j, c.numel() - 1) for c, s, j in zip(curves, sizes, js))
        if kept <= budget:
            d = sum(float(c[j]) for c, j in zip(curves, js))
            if best is None or d < best[0]:
                best = (d, js)
    return best


def _random_curves(seed, lengths):
    g = torch.Generator().manual_seed(seed)  # decreasing in kept weights, plus noise
    return [(torch.linspace(0, 1, k) ** 2 * (1 + 5 * torch.rand(1, generator=g)) +
             0.05 * torch.rand(k, generator=g)).double() for k in lengths]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sparsity", [0.3, 0.6, 0.9])
def test_rate_distortion_matches_exhaustive_search(seed, sparsity):
    sizes = [37, 120, 9, 64]
    curves = _random_curves(seed, [11, 6, 5, 11])
    d, js = _rd_brute(curves, sizes, sparsity)
    got = rate_distortion_amounts(curves, sizes, sparsity)
    assert sum(float(c[j]) for c, j in zip(curves, got)) == pytest.approx(d, abs=1e-12)
    assert tuple(got) == js  # continuous random curves: the optimum is unique
    sp = A.rate_distortion(curves, sizes, sparsity)
    assert sp == [grid_pruned(n, j, c.numel() - 1) / n for n, j, c in zip(sizes, js, curves)]


@pytest.mark.parametrize("seed", range(4))
def test_rate_distortion_coarse_units_keep_the_stated_guarantee(seed):
    sizes, sparsity, unit = [370, 1200, 90], 0.7, 7
    curves = _random_curves(seed + 10, [11, 11, 11])
    got = rate_distortion_amounts(curves, sizes, sparsity, unit=unit)
    kept = sum(n - grid_pruned(n, j, 10) for n, j in zip(sizes, got))
    assert kept <= sum(sizes) - round(sparsity * sum(sizes))
    d = sum(float(c[j]) for c, j in zip(curves, got))
    assert d <= _rd_brute(curves, sizes, sparsity, slack=len(sizes) * (unit - 1))[0] + 1e-12


def test_rate_distortion_errors():
    c = torch.tensor([0.0, 1.0, 2.0])
    with pytest.raises(LowbitError, match="no layers"):
        A.rate_distortion([], [], 0.5)
    with pytest.raises(LowbitError, match="2 curves for 1"):
        A.rate_distortion([c, c], [4], 0.5)
    with pytest.raises(LowbitError, match="1-D"):
        A.rate_distortion([c[None]], [4], 0.5)
    with pytest.raises(LowbitError, match="non-finite"):
        A.rate_distortion([torch.tensor([0.0, float("nan")])], [4], 0.5)
    with pytest.raises(LowbitError, match="non-finite"):
        A.rate_distortion([torch.tensor([float("inf"), 1.0])], [4], 0.5)
    with pytest.raises(LowbitError, match="no allocation reaches sparsity 0.5 without a forbidden amount"):
        A.rate_distortion([torch.tensor([0.0, float("inf")])], [4], 0.5)
    # +inf forbids an amount: the cheaper-looking collapse of the first layer is not taken
    assert A.rate_distortion([torch.tensor([0.0, 5.0, float("inf")]), torch.tensor([0.0, 1.0, 9.0])], [4, 4],
                             0.5) == [0.5, 0.5]
    with pytest.raises(LowbitError, match="outside"):
        A.rate_distortion([c], [4], 1.0)
    with pytest.raises(LowbitError, match="positive integers"):
        A.rate_distortion([c], [0], 0.5)
