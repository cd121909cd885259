"""Paper checks §15, §16, §17 (shared/papers/METHODS.md) on sklearn digits, one seed each.

Each test asserts its paper's claim and fails when the claim fails; ``bench/pruning_allocation.py``
runs the same experiments (``lowbit.pruning.alloc_checks``) on three seeds and prints the numbers.
"""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.algorithms import allocation as A
from lowbit.pruning import alloc_checks as C
from lowbit.pruning import rd_curves as R
from lowbit.pruning.small import load, prunable

pytest.importorskip("sklearn")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


@pytest.fixture(scope="module")
def wide(digits):  # the §16 model: 64-512-512-10, a small final layer
    return C.trained_mlp(digits, (64, 512, 512, 10), seed=0)


@pytest.fixture(scope="module")
def small(digits):  # the §15 "digits-MLP": 64-256-128-10
    return C.trained_mlp(digits, (64, 256, 128, 10), seed=0)


def test_16a_global_magnitude_at_least_uniform_after_finetuning(wide, digits):
    r = C.global_vs_uniform(wide, digits, sparsity=0.9, finetune=10, seed=0)
    assert r["global"] >= r["uniform"], r  # measured: 0.9755 vs 0.9710


def test_16b_layer_collapse_and_minimum_threshold(wide, digits):
    """Without a minimum the 10×512 output layer keeps 2 weights: most classes get no input and
    accuracy sits near chance even after fine-tuning. With MT = 0.1% of all weights per layer (300;
    the paper's form MT%·N_total; the brief's 1%-per-layer is infeasible at 99.5% and n_out per layer
    measured only 18-31%, see the bench) accuracy is far above."""
    n = sum(w.numel() for w in prunable(wide).values())
    r = C.collapse(wide, digits, min_keep=round(0.001 * n), sparsity=0.995, finetune=10, seed=0)
    g, mt = r["global"], r["global+MT"]
    assert min(k / o for k, o in zip(g["keeps"], g["n_out"])) < 0.5, g  # a layer feeds < half its outputs
    assert g["accuracy"] < 0.2, g
    assert all(k >= min(round(0.001 * n), w.numel()) for k, w in zip(mt["keeps"], prunable(wide).values()))
    assert abs(mt["sparsity"] - 0.995) <= 0.001 and abs(g["sparsity"] - 0.995) <= 0.001
    assert mt["accuracy"] >= 0.3 and mt["accuracy"] >= g["accuracy"] + 0.2, r  # measured 0.41 vs 0.09


def test_17_random_pruning_gap_shrinks_with_width_and_erk_helps_narrow(digits):
    """Widths 32 and 128 here (512 in the bench: measured gap -0.4 points). Measured on seed 0:
    width 32 dense 0.949, ERK 0.479, uniform 0.376; width 128: 0.967, 0.935, 0.900."""
    r = {w: C.random_sparse(digits, w, sparsity=0.9, epochs=30, seed=0) for w in (32, 128)}
    gap = {w: v["dense"] - max(v["erk"], v["uniform"]) for w, v in r.items()}
    assert gap[128] < gap[32], r
    assert r[32]["erk"] >= r[32]["uniform"], r
    shapes = [tuple(w.shape) for w in prunable(C.mlp([64, 32, 32, 10])).values()]
    sp = A.erk(shapes, 0.9)
    dens = [1 - s for s in sp]
    assert all(d <= 1.0 for d in dens)
    assert sum(d * math.prod(s) for d, s in zip(dens, shapes)) == pytest.approx(0.1 * sum(map(math.prod, shapes)))


@pytest.fixture(scope="module")
def curves(small, digits):
    return R.layer_curves(small, digits.train.x[:512], steps=100)


def test_15a_distortion_is_additive(small, digits, curves):
    assert C.additivity(small, digits.train.x[:512], curves, pairs=40, max_amount=0.6, seed=0) > 0.9


@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_15b_dp_beats_uniform_and_erk(small, digits, curves, sparsity):
    r = C.rd_compare(small, digits, sparsity, curves=curves)
    assert r["dp"]["mse"] < r["uniform"]["mse"] and r["dp"]["mse"] < r["erk"]["mse"], r
    assert r["dp"]["sparsity"] >= sparsity  # never keeps more than the budget


def test_15c_dp_matches_brute_force_on_three_layers(small, digits):
    r = C.dp_vs_brute(small, digits.train.x[:512], sparsity=0.85, steps=10)
    assert r["dp_additive"] == pytest.approx(r["brute_additive"], rel=1e-12), r
    assert r["dp_true"] >= r["brute_true"]  # the true joint optimum is a lower bound
