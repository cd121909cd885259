"""NUPES (Yvinec et al., "NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search",
arXiv:2308.05600; its data-free predecessor "PowerQuant", arXiv:2301.09858), in two modes.

``mode="free"`` (the default, no data): per tensor, the power exponent ``a`` that minimizes
``||W − D(Q_a(W))||²`` (``lowbit.algorithms.nupes.search_exponent``), recorded in the spec as
``PowerFormat(bits, a)``.

``mode="data"`` (``--mode data``, with calibration data): a block solve. Per block, every targeted
Linear / GPT-2 Conv1D starts from the data-free solution (its searched exponent, its codes) and
learns, with Adam (the gradient-based PTQ study's advice, shared/papers/METHODS.md §8), its
exponent ``a`` and a free offset per weight in the power domain
(``lowbit.algorithms.nupes_data``), on the mean squared error between the block's output on the
quantized model's inputs and the float block's output. Then each layer is frozen to codes on
``PowerFormat(bits, a_learned)``, its spec recording the learned exponent as the data-free mode
records its own.

==================  ===============================================================
choice              value (and why)
==================  ===============================================================
offsets             a float per weight, in levels of the power grid, added before
                    the rounding (the grid is uniform there), free to reach any
                    level: an offset variable rather than the raw weight, as §8
                    advises; learning rate ``lr`` (levels per step)
exponent            one per tensor, as in the data-free mode, through a shifted
                    sigmoid; learning rate ``exponent_lr`` on its logit
a step              one calibration batch through the block, forward and backward;
                    batches in a fixed-seed order (same inputs, same bytes); both
                    rates decay to zero along a cosine over ``steps``
what is kept        the learned exponents and offsets if their loss over all
                    batches is below the start's, else the start (the data-free
                    solution); the block report says which (a guard of ours)
other tensors       fused experts and convolutions keep the data-free solution
                    (searched exponent, rounded to nearest on its grid), listed in
                    the block report as ``rounded_to_nearest``
==================  ===============================================================

The defaults (``steps`` 100, ``lr`` 1e-2, ``exponent_lr`` 1e-2) are guesses checked on the
digits-MLP and a tiny Llama, not measured on a real LLM.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lowbit.algorithms.nupes import search_exponent
from lowbit.algorithms.nupes_data import exponent, offset_bounds, power_codes, power_fake_quantize
from lowbit.errors import LowbitError
from lowbit.formats.grid import PowerFormat
from lowbit.models.targets import targets
from lowbit.modifiers._blockfit import Wrapped, attach_frozen, batch_order, block_loss, mse, put, training, wrap
from lowbit.modifiers.base import BlockData, BlockWork, LayerResult, Modifier, tensor_scale
from lowbit.qat.fakequant import initial_qparams
from lowbit.qtensor import QuantizedTensor, from_matrix, matrix_view
from lowbit.quantizer import check_weight, pack_matrix, quantize_matrix
from lowbit.scheme import TensorScheme
from lowbit.spec import QuantSpec

MODES = ("free", "data")


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
        w = self.inner.weight
        q = power_fake_quantize(self.W, self.spec, self.scale, exponent(self.u, self.a0), self.v)  # (rows, cols)
        return functional_call(self.inner, {"weight": from_matrix(q, tuple(w.shape), self.layout).to(w.dtype)},
                               args, kwargs)

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


@dataclass(frozen=True)
class NUPES(Modifier):
    """Power-exponent search per tensor (``mode="free"``), or that start refined by gradient on
    calibration data (``mode="data"``); see the module docstring."""

    mode: str = "free"  # "free": exponent search only, no data; "data": learned exponent and offsets per block
    steps: int = 100  # mode="data": Adam steps per block, one calibration batch each; 0 keeps the data-free start
    lr: float = 1e-2  # mode="data": learning rate of the offsets, in levels of the power grid
    exponent_lr: float = 1e-2  # mode="data": learning rate of the exponent's logit

    name = "nupes"
    needs_data_when = "--mode data"  # for `lowbit methods`

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LowbitError(f"nupes mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise LowbitError(f"nupes steps must be an integer >= 0 (0 keeps the data-free start), got {self.steps!r}")
        for name in ("lr", "exponent_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0:
                raise LowbitError(f"nupes {name} must be a number >= 0, got {value!r}")

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Data-free, except mode="data", a block solve on calibration data."""
        return self.mode == "data"

    @property
    def float_targets(self) -> bool:  # type: ignore[override]
        return self.mode == "data"

    @property
    def has_layer_solve(self) -> bool:
        return self.mode == "free"

    @property
    def has_block_solve(self) -> bool:
        return self.mode == "data"

    def check_scheme(self, scheme: TensorScheme) -> None:
        fmt = scheme.weight.format
        if not (isinstance(fmt, PowerFormat) or (fmt.family == "int" and fmt.symmetric)):
            raise LowbitError(f"method nupes needs a power or symmetric int format, not {fmt.name}; "
                              "try pow4_a0.5:g64")

    def solve_layer(self, W: Tensor, stats: Any, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 -> codes on ``PowerFormat(bits, a)`` with this tensor's ``a``."""
        self.check_scheme(scheme)
        spec = _searched(W, scheme.weight)
        gscale = tensor_scale(spec, W, global_scale)
        codes, scale, zero = quantize_matrix(W, spec, gscale)
        return LayerResult(spec, codes, scale, zero, gscale, info={"exponent": spec.format.a})

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        """Learn the exponents and offsets of ``data.layers`` on this block, then attach their
        QuantizedTensors. Returns the block's report: the keys trained (``layers``) and rounded
        to nearest, ``steps``, the block-output MSE over all batches at the start (the data-free
        solution) and at the end, which parameters were ``kept`` ("learned" or "start") and each
        trained tensor's ``exponents`` [start, end]."""
        if data.fp_out is None:
            raise LowbitError("nupes mode data needs the float block's outputs; run it through "
                              "lowbit.engine.runner.calibrate")
        layers = _start_exponents(block, data.layers)

        def make(module: nn.Module, scheme: TensorScheme, layout: str, key: str) -> PowerLinear:
            W = matrix_view(module.weight.detach().to(torch.float32), layout)  # (rows, cols)
            return PowerLinear(module, scheme.weight, W, layout)

        wrapped, rounded = wrap(block, layers, make, self.name)
        info: dict[str, Any] = {"layers": [w.key for w in wrapped]}
        if rounded:
            info["rounded_to_nearest"] = rounded
        if not wrapped:
            return info
        try:
            before = after = block_loss(block, data)
            kept = "start"
            if self.steps:
                start = _state(wrapped)
                self._train(block, wrapped, data)
                after = block_loss(block, data)
                if after < before:
                    kept = "learned"
                else:
                    _load(wrapped, start)
            exponents = {w.key: [w.layer.a0, w.layer.a] for w in wrapped}
            frozen = [w.layer.freeze() for w in wrapped]
        finally:
            for w in wrapped:
                put(block, w.name, w.layer.inner)
        for w, qt in zip(wrapped, frozen):
            attach_frozen(w.layer.inner, qt, w.scheme, w.layer.inner.weight.dtype)
        return {**info, "steps": self.steps, "loss_before": before, "loss_after": min(after, before), "kept": kept,
                "exponents": exponents}

    def _train(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData) -> None:
        """``steps`` Adam steps on the block-output MSE of one batch each, in place."""
        groups = [{"params": [w.layer.v for w in wrapped], "lr": self.lr},
                  {"params": [w.layer.u for w in wrapped], "lr": self.exponent_lr}]
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        with training(block, [p for g in groups for p in g["params"]]):
            for j in batch_order(len(data.calls), self.steps):
                loss = mse(data.calls[j].run(block, data.q_in[j]), data.fp_out[j])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                for w in wrapped:
                    w.layer.project()

    def memory(self, work: BlockWork) -> int:
        """Bytes held while training one block (0 in mode "free", beyond the engine's own).

        Per weight: the float32 copy, the offset with its gradient, Adam's two moments and the
        start's snapshot (24 B), and what the rounding graph keeps for the backward pass
        (power-domain values and levels in float64, the float32 reconstruction, residual
        derivatives, spacing, codes: about 45 B). Per token of a batch: every layer's input
        and output in float32, twice (the backward pass).
        """
        if self.mode == "free":
            return 0
        weights = sum(r * c for r, c in work.layers)
        per_token = 2 * 4 * sum(r + c for r, c in work.layers)
        return weights * (24 + 45) + per_token * work.batch_tokens

    def flops(self, work: BlockWork) -> float:
        """Mode "free": the exponent search, about 14 roundings of every weight (about 30
        operations each). Mode "data": that, then ``steps`` forward and backward passes of one
        batch through the layers (6·rows·cols per token), the power quantization and its
        surrogate gradients per weight per step (about 80 operations, three powers among them),
        and two scoring passes over all tokens."""
        weights = sum(r * c for r, c in work.layers)
        search = 14 * 30 * weights
        if self.mode == "free":
            return float(search)
        return float(search + self.steps * (6 * weights * work.batch_tokens + 80 * weights)
                     + 2 * 2 * weights * work.tokens)


def _searched(W: Tensor, spec: QuantSpec) -> QuantSpec:
    """``spec`` with its format replaced by ``PowerFormat(bits, a)``, ``a`` searched on W."""
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
        out.append((key, module, param, replace(scheme, weight=_searched(W, scheme.weight))))
    return out


def _state(wrapped: list[Wrapped]) -> list[Tensor]:
    return [p.detach().clone() for w in wrapped for p in (w.layer.v, w.layer.u)]


def _load(wrapped: list[Wrapped], state: list[Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip([p for w in wrapped for p in (w.layer.v, w.layer.u)], state):
            p.copy_(value)
