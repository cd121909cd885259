"""NUPES's data mode (``nupes --mode data``, ``lowbit.modifiers.nupes``): a block solve that
refines the data-free solution on calibration data, and the data-free solution of one tensor
(``searched``) that both modes share.

Per block, every targeted Linear / GPT-2 Conv1D is swapped for a ``PowerLinear`` that starts from
the data-free solution (its searched exponent, its codes) and learns, with Adam, its exponent
``a`` and a free offset per weight in the power domain (``lowbit.algorithms.nupes_data``), on the
mean squared error between the block's output on the quantized model's inputs and the float
block's output; both rates decay to zero along a cosine over ``steps``. The learned exponents
and offsets are kept if their loss over all batches is below the start's, else the start. Then
each layer is frozen to codes on ``PowerFormat(bits, a_learned)``. The choices and their reasons
are in ``lowbit.modifiers.nupes``'s docstring.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms.nupes import search_exponent
from lowbit.algorithms.nupes_data import exponent, offset_bounds, power_codes, power_fake_quantize
from lowbit.errors import LowbitError
from lowbit.formats.grid import PowerFormat
from lowbit.models.targets import targets
from lowbit.modifiers._blockfit import (Wrapped, batch_order, block_loss, forward_with, keep_better, mse, solve_wrapped,
                                       training)
from lowbit.modifiers.base import BlockData
from lowbit.qat.fakequant import initial_qparams
from lowbit.qtensor import QuantizedTensor, matrix_view
from lowbit.quantizer import check_weight, pack_matrix
from lowbit.scheme import TensorScheme
from lowbit.spec import QuantSpec

METHOD = "nupes mode data"  # how error messages name this mode


class PowerLinear(nn.Module):
    """Wraps ``inner`` (an ``nn.Linear`` (out, in) or a GPT-2 ``Conv1D`` (in, out)) and computes its
    forward with the power quantization of ``W`` (the float32 matrix view, rows × cols).

    spec: ``PowerFormat(bits, a0)`` at its granularity, ``a0`` the data-free exponent; scale: the
    (grid_rows, grid_cols) float32 stored block scales, fixed; v: (rows, cols) float32 offsets in
    levels; u: the 0-dim float64 exponent variable (``a = exponent(u, a0)``).
    """

    def __init__(self, inner: nn.Module, spec: QuantSpec, W: Tensor, layout: str) -> None:
        super().__init__()
        self.inner, self.spec, self.layout, self.a0 = inner, spec, layout, spec.format.a
        self.register_buffer("W", W)
        self.register_buffer("scale", initial_qparams(W, spec)[0])
        self.v = nn.Parameter(torch.zeros_like(W))
        self.u = nn.Parameter(torch.zeros((), dtype=torch.float64))

    @property
    def a(self) -> float:
        return float(exponent(self.u.detach(), self.a0))

    def forward(self, *args, **kwargs):
        q = power_fake_quantize(self.W, self.spec, self.scale, exponent(self.u, self.a0), self.v)  # (rows, cols)
        return forward_with(self.inner, q, self.layout, args, kwargs)

    @torch.no_grad()
    def project(self) -> None:
        """Keep every offset where it can still change its code (``offset_bounds``)."""
        lo, hi = offset_bounds(self.W, self.spec, self.scale, self.a)
        self.v.copy_(torch.minimum(torch.maximum(self.v, lo), hi))

    @torch.no_grad()
    def freeze(self) -> QuantizedTensor:
        a = self.a
        spec = replace(self.spec, format=PowerFormat(self.spec.format.bits, a))
        codes = power_codes(self.W, spec, self.scale, a, self.v)
        return pack_matrix(spec, tuple(self.inner.weight.shape), self.layout, codes, self.scale, None, None)


def solve_data(block: nn.Module, data: BlockData, steps: int, lr: float, exponent_lr: float) -> dict[str, Any]:
    """Learn the exponents and offsets of ``data.layers`` on ``block`` (``steps`` Adam steps, at
    ``lr`` for the offsets and ``exponent_lr`` for the exponents' logits), then attach their
    QuantizedTensors; returns the block report (``NUPES.solve_block``)."""
    def make(module: nn.Module, scheme: TensorScheme, layout: str, key: str) -> PowerLinear:
        W = matrix_view(module.weight.detach().to(torch.float32), layout)  # (rows, cols)
        return PowerLinear(module, scheme.weight, W, layout)

    def fit(wrapped: list[Wrapped]) -> tuple[list[QuantizedTensor], dict[str, Any]]:
        params = [p for w in wrapped for p in (w.layer.v, w.layer.u)]
        train = (lambda: _train(block, wrapped, data, steps, lr, exponent_lr)) if steps else None
        before, after, learned = keep_better(lambda: block_loss(block, data), params, train)
        exponents = {w.key: [w.layer.a0, w.layer.a] for w in wrapped}
        return [w.layer.freeze() for w in wrapped], {
            "steps": steps, "loss_before": before, "loss_after": min(after, before),
            "kept": "learned" if learned else "start", "exponents": exponents}

    return solve_wrapped(block, replace(data, layers=_start_exponents(block, data.layers)), make, METHOD, fit)


def _train(block: nn.Module, wrapped: list[Wrapped], data: BlockData, steps: int, lr: float,
           exponent_lr: float) -> None:
    """``steps`` Adam steps on the block-output MSE of one batch each, in place."""
    groups = [{"params": [w.layer.v for w in wrapped], "lr": lr},
              {"params": [w.layer.u for w in wrapped], "lr": exponent_lr}]
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    with training(block, [p for g in groups for p in g["params"]]):
        for j in batch_order(len(data.calls), steps):
            loss = mse(data.calls[j].run(block, data.q_in[j]), data.fp_out[j])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            for w in wrapped:
                w.layer.project()


def searched(W: Tensor, spec: QuantSpec) -> QuantSpec:
    """``spec`` with its format replaced by ``PowerFormat(bits, a)``, ``a`` searched on W
    (rows, cols) float32: the data-free solution."""
    a = search_exponent(W, spec.format.bits, spec.granularity, scale_dtype=spec.scale_dtype)
    return replace(spec, format=PowerFormat(spec.format.bits, a))


def _start_exponents(block: nn.Module, layers: list) -> list:
    """``layers`` (key, module, param, scheme) with each scheme's weight format replaced by the
    data-free solution's ``PowerFormat(bits, a)``, searched on that tensor's matrix view."""
    names = {id(m): n for n, m in block.named_modules()}
    known = {(t.module_name, t.param): t for t in targets(block)}
    out = []
    for key, module, param, scheme in layers:
        target = known.get((names.get(id(module)), param))
        if target is None:
            raise LowbitError(f"{key} is not a quantizable tensor of the block being solved")
        W = matrix_view(getattr(module, param).detach().to(torch.float32), target.layout)  # (rows, cols)
        check_weight(W, scheme.weight, *W.shape, key)
        out.append((key, module, param, replace(scheme, weight=searched(W, scheme.weight))))
    return out
