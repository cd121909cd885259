"""shared/papers/METHODS.md §8 checks on digits-MLP (64-256-128-10, Adam lr 1e-3, 30 epochs, 80/20
split, seeded) at W3 per-channel, with layer-wise AdaRound on 128 calibration inputs:
Adam >= SGD on test accuracy, and real vs Gaussian-noise calibration within 2 points.

Measured (2 cores): float 98.05%, round to nearest 98.05% (W3 per-channel loses nothing here, so
these checks cannot tell much apart); AdaRound lr 1e-2, 100 steps: Adam 97.49% < SGD 98.05%
(SGD with lr 1e-2 does not move V: the guard keeps RTN), real 97.49% vs noise 97.21%.
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


@pytest.fixture(scope="module")
def trained():
    data = small.load("digits", test_fraction=0.2, seed=0)
    model = small.mlp([64, 256, 128, 10], seed=0)
    small.train(model, data.train, epochs=30, lr=1e-3, seed=0)
    calib = data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:128]]
    return model, data, calib


def accuracy_after(trained, x: torch.Tensor, **options) -> float:
    model, data, _ = trained
    model = copy.deepcopy(model)
    calibrate(model, default_plan(model, parse_tensor_scheme("int3:channel")),
              make("adaround", scope="layer", steps=100, lr=1e-2, **options), list(x.split(32)), progress=False)
    return 100 * small.accuracy(model, data.test)


@pytest.mark.xfail(strict=True, reason="measured: Adam 97.49% < SGD 98.05% (SGD leaves round-to-nearest, which "
                                       "is lossless at W3 here; Adam overfits 128 inputs)")
def test_adam_is_at_least_as_good_as_sgd(trained):
    assert accuracy_after(trained, trained[2], optimizer="adam") >= accuracy_after(trained, trained[2], optimizer="sgd")


def test_noise_calibration_is_within_two_points_of_real_data(trained):
    model, data, calib = trained
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(calib.shape, generator=g) * data.train.x.std() + data.train.x.mean()
    assert abs(accuracy_after(trained, calib) - accuracy_after(trained, noise)) < 2.0
