"""MetaAug (Pham et al., ECCV 2024; shared/papers/METHODS.md §11) as a block solve: block-wise
AdaRound whose calibration inputs are augmented by a small network T learned for the purpose.

Per block, in two phases:

1. **T is learned** (``meta_steps`` steps, one calibration batch ``x`` each, T warm-started at the
   identity). Each step takes one differentiable AdaRound step of the block on ``T(x)`` (block
   output error against the float block on ``T(x)``, plus the rounding regularizer), then scores
   the stepped block on the original ``x`` (against the float block's outputs), adds a margin
   that makes T change its inputs and a PKT term that keeps their structure, and moves T by Adam
   on the gradient of that score through the step, clipped to norm 0.1
   (``lowbit.algorithms.metaaug`` has the formulas and our guesses). The block's rounding itself
   does not move in this phase, as in the authors' code (their ``higher`` step acts on a copy).
2. **The block is reconstructed** as ``adaround`` does (``steps`` Adam steps on V, the same
   β schedule), over the original batches and their augmentations ``T(x)`` together: a
   fixed-seed order over both. An augmented batch's target is the float block on ``T`` of the
   float model's hidden states, its input ``T`` of the quantized model's.

The learned rounding is kept only if its block-output error on the original calibration data is
below round-to-nearest's (``adaround``'s guard). With ``meta_steps`` 0 the run is ``adaround``'s
bit for bit. The block report adds ``meta_steps``, ``meta_loss`` (the outer loss at the first
and last meta step) and ``augment_change`` (T's relative mean-square change of the block's
inputs, averaged over the batches). T is a fresh network per block (the paper shares one UNet across blocks); each block
resumes on its own.

Why a method and not ``adaround --augment meta``: MetaAug brings eight options of its own that
mean nothing without the augmentation, and it only reconstructs blocks (``scope`` "layer" is
refused); a separate name keeps ``adaround``'s options plain and the report's method honest.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lowbit.algorithms.adaround import beta_at, rectified_sigmoid, regularizer
from lowbit.algorithms.metaaug import (PKT_ROWS, init_transform, kl_distance, margin_penalty, meta_gradient,
                                       mixup, mixup_draw, pkt, relative_change, transform)
from lowbit.errors import LowbitError
from lowbit.modifiers._blockfit import Wrapped, batch_order, put, training
from lowbit.modifiers.adaround import AdaRound, _reconstruction, _set_mode
from lowbit.modifiers.base import BlockData, BlockWork

CLIP = 0.1  # the norm T's gradient is clipped to (the authors' code)


class _Runner(nn.Module):
    """``call.run(block, hidden)`` as a module, so ``functional_call`` can swap the block's V."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, hidden: Tensor, call: Any) -> Tensor:
        return call.run(self.block, hidden)


@contextmanager
def floating(block: nn.Module, wrapped: list[Wrapped]) -> Iterator[None]:
    """The block with its float layers in place of the wrappers (no rounding, no input rounding)."""
    for w in wrapped:
        put(block, w.name, w.layer.inner)
    try:
        yield
    finally:
        for w in wrapped:
            put(block, w.name, w.layer)


def _positive(name: str, value: Any, zero_ok: bool = True) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not zero_ok):
        raise LowbitError(f"metaaug {name} must be a number {'>= 0' if zero_ok else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class MetaAug(AdaRound):
    """Block-wise AdaRound on calibration inputs augmented by a learned T (module docstring)."""

    meta_steps: int = 200  # steps learning T per block (the paper: 500); 0 is plain adaround
    meta_lr: float = 1e-2  # Adam's rate for T (the default of the authors' code)
    outer: str = "mse"  # the outer distance: "mse" (hidden states) or "kl" (logits, at T = 4)
    outer_weight: float = 5.0  # α, the weight of the outer distance
    margin_weight: float = 0.5  # β, the weight of ReLU(τ − relative change of the inputs)
    pkt_weight: float = 30000.0  # γ, the weight of the PKT term (0 skips it)
    margin: float = 0.1  # τ, the relative mean-square change T must make
    width: int = 64  # T's hidden width
    meta_seed: int = 0  # T's start, the mixup draws and the meta batch order (not --seed: the run's calibration seed)

    name = "metaaug"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("meta_steps", "width", "meta_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "width" else 0):
                raise LowbitError(f"metaaug {name} must be an integer >= {1 if name == 'width' else 0}, got {value!r}")
        _positive("meta_lr", self.meta_lr, zero_ok=False)
        for name in ("outer_weight", "margin_weight", "pkt_weight", "margin"):
            _positive(name, getattr(self, name))
        if self.outer not in ("mse", "kl"):
            raise LowbitError(f"metaaug outer {self.outer!r} is not allowed; "
                              "use 'mse' (hidden states) or 'kl' (logits)")
        if self.scope != "block":
            raise LowbitError(f"metaaug scope {self.scope!r} is not allowed: it reconstructs whole blocks; use 'block'")

    def _train_block(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData) -> dict[str, Any]:
        """Learn T, then ``steps`` AdaRound steps over the original and augmented batches; returns
        the meta numbers of the block report."""
        layers = [w.layer for w in wrapped]
        V = [layer.V for layer in layers]
        n = len(data.calls)
        info: dict[str, Any] = {"meta_steps": self.meta_steps}
        theta = self._learn_transform(block, wrapped, data, info) if self.meta_steps else None
        optimizer = self._optimizer(V)
        _set_mode(wrapped, "soft")
        with training(block, V):
            for step, k in enumerate(batch_order(2 * n if theta is not None else n, self.steps)):
                j = k % n
                x, target = (data.q_in[j], data.fp_out[j]) if k < n else self._augmented(block, wrapped, data, j, theta)
                out = data.calls[j].run(block, x)  # (B, T, hidden)
                self._step(optimizer, _reconstruction(out, target), layers, step)
        return info

    @torch.no_grad()
    def _augmented(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData, j: int,
                   theta: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(T(q_in[j]), the float block on T(fp_in[j])), both without gradients."""
        with floating(block, wrapped):
            target = data.calls[j].run(block, transform(_fp_in(data, j), theta))
        return transform(data.q_in[j], theta), target

    def _learn_transform(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData,
                         info: dict[str, Any]) -> list[Tensor]:
        """T's parameters after ``meta_steps`` clipped Adam steps on the outer loss (detached)."""
        generator = torch.Generator().manual_seed(self.meta_seed)
        theta = [t.requires_grad_() for t in init_transform(data.q_in[0].shape[-1], self.width, generator)]
        optimizer = torch.optim.Adam(theta, lr=self.meta_lr)
        V = [w.layer.V for w in wrapped]
        names = [f"block.{w.name}.V" for w in wrapped]
        runner = _Runner(block)
        losses = []
        _set_mode(wrapped, "soft")
        with training(block, V), sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
            for step, j in enumerate(batch_order(len(data.calls), self.meta_steps, seed=self.meta_seed + 1)):
                inner, outer = self._losses(block, runner, wrapped, names, data, j, theta, step, generator)
                grads, loss = meta_gradient(inner, outer, V, theta, self.lr)
                for t, g in zip(theta, grads):
                    t.grad = torch.zeros_like(t) if g is None else g
                torch.nn.utils.clip_grad_norm_(theta, CLIP)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss))
        theta = [t.detach() for t in theta]
        n = len(data.q_in)
        with torch.no_grad():
            change = sum(float(relative_change(transform(data.q_in[j], theta), data.q_in[j])) for j in range(n)) / n
        info.update(meta_loss=[losses[0], losses[-1]], augment_change=change)
        return theta

    def _losses(self, block: nn.Module, runner: _Runner, wrapped: list[Wrapped], names: list[str], data: BlockData,
                j: int, theta: list[Tensor], step: int, generator: torch.Generator):
        """The inner loss (a function of V) and the outer loss (a function of V') of batch ``j``."""
        call, x_q, x_fp = data.calls[j], data.q_in[j], _fp_in(data, j)
        aug_q, aug_fp = transform(x_q, theta), transform(x_fp, theta)  # (B, T, hidden), through θ
        with floating(block, wrapped):
            target = call.run(block, aug_fp)
        beta = beta_at(step, self.meta_steps)

        def inner(V: list[Tensor]) -> Tensor:
            loss = _reconstruction(call.run(block, aug_q), target)
            if beta is not None and self.reg:
                loss = loss + self.reg * sum(regularizer(rectified_sigmoid(v), beta) for v in V)
            return loss

        def outer(updated: list[Tensor]) -> Tensor:
            out = functional_call(runner, dict(zip(names, updated)), (x_q, call))
            fp_out = data.fp_out[j]
            distance = kl_distance(out, fp_out) if self.outer == "kl" else _reconstruction(out, fp_out)
            loss = self.outer_weight * distance + self.margin_weight * margin_penalty(aug_q, x_q, self.margin)
            return loss + self._pkt(block, wrapped, call, x_fp, aug_fp, generator) if self.pkt_weight else loss

        return inner, outer

    def _pkt(self, block: nn.Module, wrapped: list[Wrapped], call: Any, x: Tensor, augmented: Tensor,
             generator: torch.Generator) -> Tensor:
        """γ · PKT(float block on mixup(T(x)), float block on mixup(x)), the same mixup for both."""
        lam, partner = mixup_draw(x.shape[0], generator)
        with floating(block, wrapped):
            student = call.run(block, mixup(augmented, lam, partner))
            with torch.no_grad():
                teacher = call.run(block, mixup(x, lam, partner))
        return self.pkt_weight * pkt(student, teacher)

    def memory(self, work: BlockWork) -> int:
        """Bytes held while training one block: ``adaround``'s, plus the meta step's.

        The unrolled step keeps a second graph of the soft rounding and the inner gradient and V'
        per weight (about 40 B), and per token the inputs and outputs of every layer about four
        times over (inner forward and backward with their graph, the outer and PKT forwards:
        32 B per feature). T: its parameters, gradients and Adam moments (16 B each) at the
        block's hidden size (taken as the narrowest layer input); PKT: a few (N, N) matrices.
        """
        if not self.meta_steps:
            return super().memory(work)
        hidden = min(c for _, c in work.layers)
        weights = sum(r * c for r, c in work.layers)
        per_token = 4 * 2 * 4 * sum(r + c for r, c in work.layers)
        pkt_rows = min(PKT_ROWS, work.batch_tokens)
        return super().memory(work) + 40 * weights + per_token * work.batch_tokens \
            + 16 * 2 * hidden * self.width + 6 * 4 * pkt_rows ** 2

    def flops(self, work: BlockWork) -> float:
        """``adaround``'s, plus per meta step about six forward-and-backward passes of one batch
        (inner with its graph, its double backward, outer, the float passes, PKT) and, for the
        augmented half of the reconstruction steps, T and a float forward of one batch."""
        weights = sum(r * c for r, c in work.layers)
        per_pass = 6 * weights * work.batch_tokens
        augmented = self.steps // 2 * 2 * weights * work.batch_tokens if self.meta_steps else 0
        return super().flops(work) + self.meta_steps * 6 * per_pass + augmented


def _fp_in(data: BlockData, j: int) -> Tensor:
    """The float model's hidden states entering the block for batch ``j`` (``q_in`` if not kept)."""
    return data.q_in[j] if data.fp_in is None else data.fp_in[j]
