"""Magnitude and random pruning through the engine, and the layer-adaptive allocations at planning:
masks against obvious references, exact counts, seeds, the Minimum Threshold, and bad options."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.algorithms.magnitude import magnitude_mask, random_mask
from lowbit.errors import LowbitError
from lowbit.modifiers import make
from lowbit.nn.reference import masks
from lowbit.scheme import SparsitySpec

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import families  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    return families.llama().eval()


def test_magnitude_mask_drops_the_smallest_of_the_whole_layer_ties_in_order():
    W = torch.randint(-3, 4, (6, 10), generator=torch.Generator().manual_seed(0)).float()  # many ties
    keep = magnitude_mask(W, SparsitySpec("unstructured", 0.4))
    flat = W.abs().reshape(-1).tolist()
    dropped = sorted(range(60), key=lambda i: (flat[i], i))[:24]
    expect = torch.ones(60, dtype=torch.bool)
    expect[dropped] = False
    assert torch.equal(keep, expect.reshape(6, 10))
    nm = magnitude_mask(torch.randn(6, 12), SparsitySpec("nm", n=2, m=4))
    assert torch.equal(nm.reshape(6, 3, 4).sum(-1), torch.full((6, 3), 2))


def test_random_mask_has_exact_counts_and_follows_its_generator():
    sp = SparsitySpec("unstructured", 0.3)
    a = random_mask((8, 20), sp, torch.Generator().manual_seed(1))
    b = random_mask((8, 20), sp, torch.Generator().manual_seed(1))
    c = random_mask((8, 20), sp, torch.Generator().manual_seed(2))
    assert int((~a).sum()) == 48 and torch.equal(a, b) and not torch.equal(a, c)


def test_magnitude_through_the_engine_with_each_allocation():
    base = tiny_llama()
    sizes = {n: m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    for allocation in ("uniform", "global", "erk", "lamp"):
        model = lowbit.quantize(tiny_llama(), "s=60%", method="magnitude", allocation=allocation, progress=False)
        found = {n: m for n, _, m in masks(model)}
        pruned = sum(int((~m).sum()) for m in found.values())
        assert abs(pruned - 0.6 * sum(sizes.values())) <= len(sizes), allocation  # the run's target, to rounding
        for name, keep in found.items():
            assert torch.equal(model.get_submodule(name).weight == 0, ~keep)
        ratios = {round(float((~m).float().mean()), 2) for m in found.values()}
        assert (ratios == {0.6}) == (allocation == "uniform"), allocation


def test_global_allocation_refuses_layer_collapse_and_the_minimum_prevents_it():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1e-3)  # a layer global magnitude would wipe out
    with pytest.raises(LowbitError, match="allocation=global would prune all of model.layers.0.self_attn.q_proj; "
                                          "lower the sparsity or use allocation=global with min_keep"):
        lowbit.quantize(model, "s=95%", method="magnitude", allocation="global", progress=False)  # layer collapse
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1e-3)
    kept = lowbit.quantize(model, "s=95%", method="magnitude", allocation="global", min_keep=0.02, progress=False)
    for name, keep in ((n, m) for n, _, m in masks(kept)):
        assert int(keep.sum()) >= 0.02 * keep.numel(), name


def test_random_is_seeded_per_layer():
    a = {n: m for n, _, m in masks(lowbit.quantize(tiny_llama(), "s=50%", method="random", seed=3, progress=False))}
    b = {n: m for n, _, m in masks(lowbit.quantize(tiny_llama(), "s=50%", method="random", seed=3, progress=False))}
    c = {n: m for n, _, m in masks(lowbit.quantize(tiny_llama(), "s=50%", method="random", seed=4, progress=False))}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_options_are_refused():
    with pytest.raises(LowbitError, match="allocation 'owl' unknown; use one of uniform, global, erk, lamp, rd"):
        make("magnitude", allocation="owl")
    with pytest.raises(LowbitError, match="min_keep applies to allocation=global or rd only"):
        make("magnitude", min_keep=0.01)
    with pytest.raises(LowbitError, match=r"min_keep 1\.5 must be a fraction"):
        make("magnitude", allocation="global", min_keep=1.5)
    with pytest.raises(LowbitError, match="only unstructured sparsity .* can; .* has nm sparsity"):
        lowbit.quantize(tiny_llama(), "s=2:4", method="magnitude", allocation="erk", progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_calibrated_pruners_take_the_same_allocations(method):
    calib = torch.randint(0, families.V, (4, 16), generator=torch.Generator().manual_seed(0))
    model = lowbit.quantize(tiny_llama(), "s=60%", method=method, allocation="erk", calib=calib, progress=False)
    found = {n: m for n, _, m in masks(model)}
    total = sum(m.numel() for m in found.values())
    pruned = sum(int((~m).sum()) for m in found.values())
    assert len(found) == 14 and abs(pruned / total - 0.6) < 0.01
    assert len({round(float((~m).float().mean()), 2) for m in found.values()}) > 1  # per-layer ratios
