"""LSQ fine-tuning: learn the step sizes (and optionally the weights) of a prepared model on token
windows (Esser et al., "Learned Step Size Quantization", arXiv:1902.08153).

``finetune`` is a pure training loop: a model whose layers ``lowbit.qat.prepare`` made fake-quant,
a (n, seq) tensor of token ids in, per-step losses out; no file I/O. Two objectives:

* ``"kl"`` (default): ``KL(float model || fake-quant model)`` over the next-token distributions,
  the float model being the same model with its fake quantization switched off
  (``lowbit.qat.float_weights``), so no second copy is held;
* ``"ce"``: the causal-LM next-token cross-entropy on the windows themselves.

Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980) updates the
scales; since Adam's steps have the size of the learning rate whatever the gradient's, each
layer's scale learning rate is ``lr`` times that layer's mean initial scale, so ``lr`` is a
relative step (the default 5e-3 moves a scale by about 0.5% per step) for every format and layer. Same model,
windows and seed give the same bytes after ``freeze_model``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.errors import LowbitError
from lowbit.qat.layer import fake_quant_layers, float_weights

OBJECTIVES = ("kl", "ce")


def finetune(model: nn.Module, windows: Tensor, steps: int, lr: float = 5e-3, objective: str = "kl",
             batch_size: int = 4, train_weights: bool = False, weight_lr: float = 1e-5, seed: int = 0,
             progress: bool = True) -> list[float]:
    """Train the learned scales of ``model``'s fake-quant layers for ``steps`` steps; in place.

    windows: (n, seq) int64 token ids; each step takes ``batch_size`` of them, in an order drawn
    from ``seed`` (a fresh permutation each pass). lr: relative scale learning rate (module
    docstring). train_weights: also train the layers' float weights with Adam at ``weight_lr``
    (absolute; with objective "ce" only, since KL's target is these same float weights). Returns the loss of every step (float, before that step's update).
    """
    layers = [layer for _, layer in fake_quant_layers(model)]
    _check(layers, windows, steps, objective, batch_size, train_weights)
    optimizer = torch.optim.Adam(_param_groups(layers, lr, train_weights, weight_lr))
    frozen = _freeze_others(model, layers, train_weights)
    was_training = model.training
    model.eval()  # no dropout: the result depends on the seed and windows only
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    try:
        for _ in tqdm(range(steps), desc=f"lsq ({objective})", unit="step", disable=not progress):
            if len(order) < batch_size:
                order += torch.randperm(windows.shape[0], generator=generator).tolist()
            batch, order = windows[order[:batch_size]], order[batch_size:]
            loss = window_loss(model, batch, objective)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return losses


def window_loss(model: nn.Module, batch: Tensor, objective: str = "kl") -> Tensor:
    """Mean per-token loss of ``model`` on ``batch`` (b, seq) int64: KL from the float model
    (fake quantization off) or next-token cross-entropy; () float32, differentiable."""
    logits = model(input_ids=batch).logits[:, :-1].float()  # (b, seq-1, vocab)
    if objective == "ce":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    with torch.no_grad(), float_weights(model):
        target = model(input_ids=batch).logits[:, :-1].float()
    log_q = F.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])  # (tokens, vocab)
    log_p = F.log_softmax(target, dim=-1).reshape(-1, logits.shape[-1])
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, objective: str = "kl", batch_size: int = 4) -> float:
    """Mean of ``window_loss`` over all ``windows`` (n, seq), in batches; no gradients."""
    total, n = 0.0, windows.shape[0]
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        total += float(window_loss(model, batch, objective)) * batch.shape[0]
    return total / n


def _check(layers: list, windows: Tensor, steps: int, objective: str, batch_size: int, train_weights: bool) -> None:
    if not layers:
        raise LowbitError("the model has no fake-quant layers; call lowbit.qat.prepare(model, plan) first")
    if not train_weights and not any(layer.learn_scale for layer in layers):
        raise LowbitError("nothing to train: prepare the model with learn_scale=True, or pass train_weights=True")
    if objective not in OBJECTIVES:
        raise LowbitError(f"objective {objective!r} unknown; use one of {', '.join(OBJECTIVES)}")
    if train_weights and objective == "kl":
        raise LowbitError("objective 'kl' takes the model with fake quantization off as its target, which would move "
                          "as the weights train; use objective='ce' with train_weights=True")
    if windows.dim() != 2 or windows.dtype != torch.int64 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise LowbitError(f"windows must be a (n, seq) int64 tensor of token ids with seq >= 2, got "
                          f"{tuple(windows.shape)} {windows.dtype}")
    if steps < 1 or batch_size < 1:
        raise LowbitError(f"steps ({steps}) and batch_size ({batch_size}) must be positive integers")


def _param_groups(layers: list, lr: float, train_weights: bool, weight_lr: float) -> list[dict]:
    groups = []
    for layer in layers:
        if layer.learn_scale:
            mean = float(layer.scale.detach().abs().mean())
            groups.append({"params": [layer.scale], "lr": lr * (mean if mean > 0 else 1.0)})
        if train_weights:
            groups.append({"params": [layer.weight], "lr": weight_lr})
    return groups


def _freeze_others(model: nn.Module, layers: list, train_weights: bool) -> list[nn.Parameter]:
    """Turn off gradients for every parameter that is not trained; returns them to restore."""
    trained = {id(layer.scale) for layer in layers if layer.learn_scale}
    if train_weights:
        trained |= {id(layer.weight) for layer in layers}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained]
    for p in frozen:
        p.requires_grad_(False)
    return frozen
