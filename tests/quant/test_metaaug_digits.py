"""shared/papers/METHODS.md §11's small check, on the digits-MLP of test_adaround_digits.py
(64-256-128-10, the whole MLP one block, its output the logits) at W2A4 (int2 per channel,
int4 per-token inputs), 64 calibration images per seed, seeds 0-2: block-wise AdaRound (200 steps,
lr 1e-2) against MetaAug with the same reconstruction and its defaults (200 meta steps, α 5, β 0.5,
γ 30000, τ 0.1), with the KL outer distance since the block's output is logits.

The paper's claim: MetaAug's calibration-vs-test accuracy gap is smaller, and its test accuracy at
least the baseline's. Measured (2 cores, 1 thread; float 98.05%, round to nearest 94.43% test):

====  ==========================  ==========================
seed  AdaRound cal / test (gap)   MetaAug cal / test (gap)
====  ==========================  ==========================
0     96.88 / 94.43 (2.45)        96.88 / 94.99 (1.89)
1     98.44 / 95.26 (3.17)        95.31 / 93.59 (1.72)
2     98.44 / 95.26 (3.17)        98.44 / 95.82 (2.62)
mean  97.92 / 94.98 (2.93)        96.88 / 94.80 (2.08)
====  ==========================  ==========================

The gap shrinks, but by lower calibration accuracy as much as by higher test accuracy, and test
accuracy is 0.19 points lower on average: the second half of the claim does not hold here.
Every difference is a sample or two (1.56 points on 64 images, 0.28 on the 359 test images).
With 50 meta steps T barely leaves the identity (relative change 1e-3, gap 3.12); with 500 the
gap is 3.45: no setting tried gives both halves.
"""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit.engine.runner import calibrate
from lowbit.modifiers import make
from lowbit.models.targets import default_plan
from lowbit.pruning import small
from lowbit.schemes import parse_tensor_scheme

pytest.importorskip("sklearn")

SCHEME = "int2:channel+a=int4:token"
RECONSTRUCTION = dict(steps=200, lr=1e-2)


@pytest.fixture(scope="module")
def runs():
    """Per seed: ((cal, test) accuracy of AdaRound, (cal, test) of MetaAug), in percent."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = small.load("digits", test_fraction=0.2, seed=0)
        model = small.mlp([64, 256, 128, 10], seed=0)
        small.train(model, data.train, epochs=30, lr=1e-3, seed=0)
        out = []
        for seed in range(3):
            pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:64]
            calib = small.Split(data.train.x[pick], data.train.y[pick])
            out.append(tuple(_accuracies(model, data, calib, make(name, **RECONSTRUCTION, **extra))
                             for name, extra in (("adaround", {}), ("metaaug", {"outer": "kl"}))))
        return out
    finally:
        torch.set_num_threads(threads)


def _accuracies(model, data, calib, method) -> tuple[float, float]:
    model = copy.deepcopy(model)
    calibrate(model, default_plan(model, parse_tensor_scheme(SCHEME)), method, list(calib.x.split(32)),
              progress=False)
    return 100 * small.accuracy(model, calib), 100 * small.accuracy(model, data.test)


def _mean(values) -> float:
    return sum(values) / len(values)


def test_metaaug_shrinks_the_calibration_test_gap(runs):
    gap = [_mean([cal - test for cal, test in (r[k] for r in runs)]) for k in (0, 1)]
    assert gap[1] < gap[0], (gap, runs)


@pytest.mark.xfail(strict=True, reason="measured: MetaAug test 94.80% < AdaRound 94.98% (mean of 3 seeds; "
                                       "per seed 94.99/93.59/95.82 vs 94.43/95.26/95.26)")
def test_metaaug_test_accuracy_is_at_least_adarounds(runs):
    test = [_mean([r[k][1] for r in runs]) for k in (0, 1)]
    assert test[1] >= test[0], (test, runs)
