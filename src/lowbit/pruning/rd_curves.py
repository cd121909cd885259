"""Rate-distortion curves of a small model (§15: Xu et al., "Efficient Joint Optimization of
Layer-Adaptive Weight Pruning in Deep Neural Networks", ICCV'23, arXiv:2308.10438).

For every prunable layer l (``small.prunable``: Linear and Conv2d weights) and every amount
j / steps, j = 0..steps, only layer l is magnitude-pruned (``grid_pruned(n, j, steps)`` of its
smallest |w|, the tie order of ``allocation.keep_largest``) and the output distortion is recorded:

    δ_l(j) = mean over calibration samples of ||Y − Ŷ||²   (Y: the unpruned model's logits)

i.e. the paper's ``mean_sample ||Y − Ŷ||²`` (= number of classes × the logits' mean squared error).
The curves feed ``allocation.rate_distortion`` directly. The model is never modified: pruned
weights are swapped in with ``torch.func.functional_call``. Float64 accumulation; deterministic.
Cost: (steps + 1) forward passes over the calibration set per layer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lowbit.algorithms.rd_allocation import grid_pruned
from lowbit.errors import LowbitError
from lowbit.pruning.masks import magnitude_masks
from lowbit.pruning.small import prunable


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, params: Mapping[str, Tensor] | None = None,
           batch_size: int = 1024) -> Tensor:
    """(N, classes) float32 outputs of ``model`` in eval mode, with ``params`` swapped in if given."""
    model.eval()
    outs = [functional_call(model, dict(params or {}), (x[i:i + batch_size],)) for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


def distortion(reference: Tensor, output: Tensor) -> float:
    """mean over samples of ||reference − output||² (both (N, classes)), accumulated in float64."""
    if reference.shape != output.shape:
        raise LowbitError(f"outputs of shape {tuple(output.shape)} do not match the reference {tuple(reference.shape)}")
    return float((reference.double() - output.double()).square().sum(1).mean())


@torch.no_grad()
def layer_curves(model: nn.Module, x: Tensor, steps: int = 100, *, batch_size: int = 1024,
                 progress: bool = False) -> dict[str, Tensor]:
    """weight name -> (steps + 1,) float64 δ_l at amounts 0, 1/steps, ..., 1 (model order).

    x: calibration inputs (N, ...) the model takes; steps: grid size (the paper's ``maxsps`` = 100).
    """
    if steps < 1:
        raise LowbitError(f"steps {steps} must be >= 1 (amounts j/steps for j = 0..steps)")
    reference = logits(model, x, batch_size=batch_size)
    curves = {}
    for name, w in tqdm(prunable(model).items(), desc="rd curves", unit="layer", disable=not progress):
        order = torch.sort(w.detach().abs().reshape(-1), stable=True).indices  # smallest first
        curve = torch.empty(steps + 1, dtype=torch.float64)
        for j in range(steps + 1):
            flat = w.detach().reshape(-1).clone()
            flat[order[:grid_pruned(w.numel(), j, steps)]] = 0.0
            curve[j] = distortion(reference, logits(model, x, {name: flat.reshape(w.shape)}, batch_size))
        curves[name] = curve
    return curves


@torch.no_grad()
def joint_distortion(model: nn.Module, x: Tensor, sparsities: Sequence[float], *,
                     reference: Tensor | None = None, batch_size: int = 1024) -> float:
    """δ with every prunable layer magnitude-pruned at once to its sparsity (one per layer, in order)."""
    weights = prunable(model)
    masks = magnitude_masks(weights, sparsities)
    pruned = {name: w.detach() * masks[name] for name, w in weights.items()}
    ref = logits(model, x, batch_size=batch_size) if reference is None else reference
    return distortion(ref, logits(model, x, pruned, batch_size))


@torch.no_grad()
def pruned_copy_accuracy(model: nn.Module, data_x: Tensor, data_y: Tensor, sparsities: Sequence[float]) -> float:
    """Top-1 accuracy with every prunable layer magnitude-pruned to its sparsity (model untouched)."""
    weights = prunable(model)
    masks = magnitude_masks(weights, sparsities)
    out = logits(model, data_x, {name: w.detach() * masks[name] for name, w in weights.items()})
    return float((out.argmax(1) == data_y).double().mean())
