"""Fire Together Wire Together: dynamic channel pruning with self-supervised mask targets.

Elkerdawy, Elhoushi, Zhang, Ray, "Fire Together Wire Together: A Dynamic Pruning Approach with
Self-Supervised Mask Prediction", CVPR 2022 (arXiv 2110.08232).

Every conv → batch-norm → ReLU block gets a tiny predictor: adaptive average pooling of the block's
*input* to ``dim × dim`` (``dim = round(sqrt(target_features / C_in))``, at least 1, as in the
authors' code), then a 1×1 conv to ``C_out`` logits. Per input, the mask ``1[σ(logit) > 0.5]``
multiplies the block's output channels. The predictor learns by BCE against targets made from
the block's own output (``out``, after the ReLU, before the mask):

* heat ``h_c = max_{y,x} |out_c|`` (the spatial max-pool; its mean over the 1×1 result is itself),
  normalized to sum to 1 per input (``channel_heat``);
* "mass" (``mass_targets``): sort ``h`` in descending order and keep the smallest set of channels
  whose cumulative heat reaches ``mthresh``. The authors' code keeps one channel fewer (it drops
  the channel that crosses ``mthresh``); we follow the paper's wording, as the brief does.
* "uniform" (``uniform_targets``): keep the top ``ceil(mthresh · C)`` channels.

Modes: "decoupled" detaches the predictor's input and the mask (the backbone learns from the task
loss only, the predictors from BCE only); "joint" lets the task loss reach the predictors through
the mask with a straight-through estimator (``binarize_ste``) and the backbone through the
predictors' input. Cost (``conv_flops``): a conv's multiply-adds per sample are
``active_in × active_out × k² × H_out × W_out``, ``active_in`` being the previous block's kept
channels (the image's channels for the first conv); biases, batch-norm and pooling are not counted.

Guessed for the small checks (tuned on digits, seed 0): Adam instead of SGD (backbone lr 1e-4,
predictors 1e-2), 10 epochs, ``target_features = 256`` (with 64, mask accuracy was 88.7% instead of
91%); the predictors run on the masked network's activations (upstream masks
applied), both in training and at test time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.pruning import small

TARGETS = ("mass", "uniform")
MODES = ("decoupled", "joint")


@dataclass(frozen=True)
class FTWTConfig:
    """mthresh: heat mass to keep ("mass") or kept channel fraction ("uniform"), in (0, 1]."""

    mthresh: float = 0.9
    targets: str = "mass"
    mode: str = "decoupled"
    epochs: int = 10
    lr: float = 1e-4
    predictor_lr: float = 1e-2
    batch_size: int = 64
    target_features: int = 256

    def __post_init__(self) -> None:
        if not 0.0 < self.mthresh <= 1.0:
            raise LowbitError(f"mthresh {self.mthresh} is outside (0, 1]")
        if self.targets not in TARGETS:
            raise LowbitError(f"unknown targets {self.targets!r}; use one of {', '.join(TARGETS)}")
        if self.mode not in MODES:
            raise LowbitError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.epochs < 0 or self.batch_size < 1 or self.target_features < 1:
            raise LowbitError(f"epochs >= 0, batch_size >= 1 and target_features >= 1 needed, got "
                              f"{self.epochs}, {self.batch_size}, {self.target_features}")


def channel_heat(out: Tensor) -> Tensor:
    """(N, C, H, W) float -> (N, C) float: per-channel max of ``|out|``, each row summing to 1
    (an all-zero row stays zero)."""
    h = out.detach().abs().amax(dim=(2, 3))
    total = h.sum(1, keepdim=True)
    return torch.where(total > 0, h / total.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))


def mass_targets(heat: Tensor, mthresh: float) -> Tensor:
    """(N, C) normalized heat -> (N, C) float {0, 1}: per row, the smallest set of the hottest channels
    whose heat sums to at least ``mthresh`` (a channel is kept when the heat before it, in descending
    order, is below ``mthresh``). Ties are broken by channel index; an all-zero row keeps nothing."""
    sorted_h, order = torch.sort(heat, dim=1, descending=True, stable=True)
    before = torch.cumsum(sorted_h, dim=1) - sorted_h  # heat of the hotter channels
    keep_sorted = (before < mthresh) & (sorted_h > 0)
    return torch.zeros_like(heat).scatter(1, order, keep_sorted.to(heat.dtype))


def uniform_targets(heat: Tensor, keep: float) -> Tensor:
    """(N, C) heat -> (N, C) float {0, 1}: the ``ceil(keep · C)`` hottest channels of each row."""
    k = math.ceil(keep * heat.shape[1])
    order = torch.sort(heat, dim=1, descending=True, stable=True).indices
    return torch.zeros_like(heat).scatter(1, order[:, :k], 1.0)


class _Binarize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Tensor) -> Tensor:
        return (prob > 0.5).to(prob.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def binarize_ste(prob: Tensor) -> Tensor:
    """``1[prob > 0.5]`` in ``prob``'s dtype; the gradient passes straight through (identity)."""
    return _Binarize.apply(prob)


def conv_flops(active_in: Tensor, active_out: Tensor, kernel: int, out_pixels: int) -> Tensor:
    """Per-sample multiply-adds of a k×k conv: active_in, active_out (N,) channel counts -> (N,) float."""
    return active_in.float() * active_out.float() * (kernel * kernel * out_pixels)


class GatedBlock(nn.Module):
    """conv → bn → act with a mask predictor; forward returns (masked out, logits, targets, mask)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, act: nn.Module, config: FTWTConfig) -> None:
        super().__init__()
        self.conv, self.bn, self.act, self.config = conv, bn, act, config
        dim = max(1, round(math.sqrt(config.target_features / conv.in_channels)))
        self.predictor = nn.Sequential(nn.AdaptiveAvgPool2d(dim), nn.Flatten(), nn.Unflatten(1, (-1, 1, 1)),
                                       nn.Conv2d(conv.in_channels * dim * dim, conv.out_channels, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.act(self.bn(self.conv(x)))                                 # (N, C_out, H, W)
        decoupled = self.config.mode == "decoupled"
        logits = self.predictor(x.detach() if decoupled else x).flatten(1)   # (N, C_out)
        with torch.no_grad():
            heat = channel_heat(out)
            make = mass_targets if self.config.targets == "mass" else uniform_targets
            target = make(heat, self.config.mthresh)
        mask = binarize_ste(torch.sigmoid(logits))
        if decoupled:
            mask = mask.detach()
        return out * mask[:, :, None, None], logits, target, mask


class Gated(nn.Module):
    """A ``small.cnn``-style Sequential whose conv → bn → act triples are ``GatedBlock``s.

    forward(x) -> (class logits, [(predictor logits, targets, mask, flops) per block]), where flops
    is the (N,) per-sample conv cost under the realized masks. ``dense_flops`` is the unmasked cost.
    """

    def __init__(self, model: nn.Sequential, config: FTWTConfig, image_side: int) -> None:
        super().__init__()
        layers, mods, i = [], list(model), 0
        while i < len(mods):
            if isinstance(mods[i], nn.Conv2d) and i + 2 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
                layers.append(GatedBlock(mods[i], mods[i + 1], mods[i + 2], config))
                i += 3
            else:
                layers.append(mods[i])
                i += 1
        blocks = [m for m in layers if isinstance(m, GatedBlock)]
        if not blocks:
            raise LowbitError("no conv -> batch-norm -> activation block to gate in the model")
        self.layers = nn.Sequential(*layers)
        training = self.training
        self.eval()  # the probe must not touch batch-norm statistics
        with torch.no_grad():
            probe = torch.zeros(1, blocks[0].conv.in_channels, image_side, image_side)
            self.dense_flops = float(self(probe, dense=True)[1][-1][3].sum())
        self.train(training)

    def forward(self, x: Tensor, dense: bool = False) -> tuple[Tensor, list[tuple[Tensor, ...]]]:
        records, active, total = [], torch.full((x.shape[0],), x.shape[1]), torch.zeros(x.shape[0])
        for layer in self.layers:
            if isinstance(layer, GatedBlock):
                y, logits, target, mask = layer(x)
                if dense:
                    y, mask = layer.act(layer.bn(layer.conv(x))), torch.ones_like(mask)
                kept = mask.detach().sum(1)
                total = total + conv_flops(active, kept, layer.conv.kernel_size[0], y.shape[2] * y.shape[3])
                active = kept
                records.append((logits, target, mask, total))
                x = y
            else:
                x = layer(x)
        return x, records


def train_predictors(gated: Gated, data: small.Split, config: FTWTConfig, seed: int = 0,
                     progress: bool = True) -> list[float]:
    """Train the predictors (BCE against the targets) and the backbone (cross-entropy through the
    masked network) together, in place; returns the mean total loss per epoch. Seeded batch order."""
    predictors = [p for n, p in gated.named_parameters() if ".predictor." in n]
    backbone = [p for n, p in gated.named_parameters() if ".predictor." not in n]
    opt = torch.optim.Adam([{"params": backbone, "lr": config.lr},
                            {"params": predictors, "lr": config.predictor_lr}])
    g = torch.Generator().manual_seed(seed)
    gated.train()
    history = []
    for _ in tqdm(range(config.epochs), desc="FTWT predictors", unit="epoch", disable=not progress):
        order, total = torch.randperm(len(data), generator=g), 0.0
        for i in range(0, len(data), config.batch_size):
            idx = order[i:i + config.batch_size]
            logits, records = gated(data.x[idx])
            bce = sum(F.binary_cross_entropy_with_logits(r[0], r[1]) for r in records)
            loss = F.cross_entropy(logits, data.y[idx]) + bce
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(data))
    gated.eval()
    return history


@dataclass(frozen=True)
class Report:
    accuracy: float          # top-1 with the predicted masks
    mask_accuracy: float     # fraction of (sample, channel) predictions equal to the targets
    flops_cut: float         # 1 − mean per-sample conv cost / dense cost
    active_mean: float       # kept channels per sample, all blocks together
    active_std: float        # their standard deviation across samples
    target_density: float    # fraction of channels the targets keep


@torch.no_grad()
def evaluate(gated: Gated, data: small.Split, batch_size: int = 1024) -> Report:
    """Accuracy, mask-prediction accuracy, FLOPs cut and active-channel statistics on ``data``."""
    gated.eval()
    right, agree, cells, flops, active, density = 0, 0.0, 0, [], [], 0.0
    for i in range(0, len(data), batch_size):
        logits, records = gated(data.x[i:i + batch_size])
        right += int((logits.argmax(1) == data.y[i:i + batch_size]).sum())
        agree += sum(float((r[2] == r[1]).sum()) for r in records)
        cells += sum(r[1].numel() for r in records)
        density += sum(float(r[1].sum()) for r in records)
        flops.append(records[-1][3])
        active.append(sum(r[2].sum(1) for r in records))
    active_t = torch.cat(active)
    return Report(right / len(data), agree / cells, 1.0 - float(torch.cat(flops).mean()) / gated.dense_flops,
                  float(active_t.mean()), float(active_t.std()), density / cells)
