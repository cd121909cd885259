"""SignRound as a block solve: learned rounding offsets and clipping multipliers per block.

For each block, every targeted Linear / GPT-2 Conv1D is swapped for a ``RoundingLinear`` whose
weight is ``lowbit.algorithms.signround``'s rounding of the float weight: offsets ``v`` per weight
and multipliers ``α``/``β`` per block of the scale grid, all starting where the start is exact.
They are learned by signed gradient descent on the mean squared error between the block's output
on the quantized model's inputs and the float block's output (the paper's block-wise
reconstruction), one calibration batch per step. Then each layer is frozen to its
``QuantizedTensor`` and attached, as every quantizing stage attaches its results.

==================  ===============================================================
choice              value (and why)
==================  ===============================================================
start               ``init="rtn"``: the spec's own grids (round-to-nearest, or
                    HQQ's zero for ``:hqq`` specs, the clip search for ``:mse``);
                    ``init="gptq"``: GPTQ's codes and grids on the block's
                    quantized inputs (one Hessian per layer, gathered with the
                    block still float), whose reconstruction becomes the weight
                    that is rounded, so that the start is GPTQ's model exactly
learning rate       ``lr`` (None: ``1/steps``, the paper's and auto-round's rule, so
                    an offset can cross its whole range [-0.5, 0.5] once), decayed
                    linearly to zero; the same for offsets and multipliers
steps               one calibration batch (the run's ``--batch-size`` windows) each,
                    in a fixed-seed order: same inputs, same bytes
what is kept        the parameters after the last step, if their block error on
                    the first ``GUARD_BATCHES`` calibration batches is below the
                    start's; else the start (a guard of ours); the block report
                    says which. auto-round keeps the step with the lowest batch
                    loss instead: on SmolLM2 (uint4:g128, blocks 0 and 15, 25 and
                    50 steps) the last step's block error was lower every time
                    (0.395 against 0.404 of the start's at 50 steps on block 0),
                    and comparing losses of different batches kept the start
                    after 10 steps
compute             ``compute="bf16"``: the training passes run under bf16 autocast
                    (the matmuls and attention in bf16, the rounding, the loss and
                    the signed steps in float32), as auto-round trains on the CPU;
                    the float targets, the guard and the frozen result stay float32.
                    On SmolLM2 (32 pydoc windows) it took 277 s against 397 s at
                    uint3:g64, each run alone, and scored 1.184× / 1.547× fp32
                    perplexity (pydoc / prose) against 1.172× / 1.600×; at w4g64
                    15.54 / 30.29 against 15.64 / 30.78 (BENCHMARKS.md)
input quantization  a scheme's dynamic input spec rounds each layer's input during
                    training too, passed straight through
other tensors       fused experts and convolutions are rounded to nearest and
                    listed in the block report as ``rounded_to_nearest``
==================  ===============================================================
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms import gptq as gptq_algo
from lowbit.algorithms._hessian import HessianStats
from lowbit.algorithms.signround import Start, clip_params, signed_step, signround_codes, signround_quantize
from lowbit.errors import LowbitError
from lowbit.modifiers._blockfit import (Wrapped, batch_order, block_loss, forward_with, keep_better, mse, solve_wrapped,
                                       training)
from lowbit.modifiers.base import BlockData, BlockWork, Modifier
from lowbit.qat.fakequant import initial_qparams
from lowbit.qtensor import QuantizedTensor, matrix_view
from lowbit.quantizer import check_weight, pack_matrix
from lowbit.scheme import TensorScheme
from lowbit.spec import QuantSpec

INITS = ("rtn", "gptq")
COMPUTES = ("bf16", "fp32")
#: calibration batches the start and the result are scored on (the first ones): the guard
GUARD_BATCHES = 4


class RoundingLinear(nn.Module):
    """Wraps ``inner`` (an ``nn.Linear`` (out, in) or a GPT-2 ``Conv1D`` (in, out)) and computes its
    forward with SignRound's rounding of ``W`` (the float32 matrix view, rows × cols).

    v: (rows, cols) float32 offsets; alpha / beta: the (grid_rows, grid_cols) float32 multipliers
    or None (``lowbit.algorithms.signround.clip_params``). ``freeze()`` gives the QuantizedTensor.
    """

    def __init__(self, inner: nn.Module, spec: QuantSpec, W: Tensor, start: Start, layout: str, key: str,
                 clip_min: float) -> None:
        super().__init__()
        self.inner, self.spec, self.start, self.layout, self.key = inner, spec, start, layout, key
        self.register_buffer("W", W)
        self.v = nn.Parameter(torch.zeros_like(W))
        alpha, beta = clip_params(spec, start)
        self.alpha = None if alpha is None else nn.Parameter(alpha)
        self.beta = None if beta is None else nn.Parameter(beta)
        self.bounds = [(self.v, -0.5, 0.5)] + [(p, clip_min, 1.0) for p in (self.alpha, self.beta) if p is not None]

    @property
    def learned(self) -> list[nn.Parameter]:
        return [p for p, _, _ in self.bounds]

    def forward(self, *args, **kwargs):
        q = signround_quantize(self.W, self.spec, self.start, self.v, self.alpha, self.beta)  # (rows, cols)
        return forward_with(self.inner, q, self.layout, args, kwargs)

    @torch.no_grad()
    def freeze(self) -> QuantizedTensor:
        codes, scale, zero = signround_codes(self.W, self.spec, self.start, self.v, self.alpha, self.beta)
        return pack_matrix(self.spec, tuple(self.inner.weight.shape), self.layout, codes, scale, zero,
                           self.start.global_scale)


@dataclass(frozen=True)
class SignRound(Modifier):
    """Learned rounding by signed gradient descent per block (module docstring)."""

    steps: int = 50  # signed-gradient steps per block, one calibration batch each; 0 keeps the start
    lr: float | None = None  # None: 1/steps
    clip_min: float = 0.5  # lower bound of the clipping multipliers (1 turns clipping off)
    init: str = "rtn"  # "rtn" (the spec's own grids, HQQ's zero for :hqq) or "gptq"
    damp: float = gptq_algo.GPTQ.damp  # GPTQ's dampening, with init="gptq"
    compute: str = "bf16"  # the training passes' matmul dtype: "bf16" (autocast) or "fp32"

    name = "signround"
    batch_windows = 2  # windows per step unless --batch-size says: measured, see the module docstring
    needs_data = True
    float_targets = True
    solves_kinds = frozenset({"linear"})

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise LowbitError(f"signround steps must be an integer >= 0 (0 keeps the start), got {self.steps!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise LowbitError(f"signround lr must be a positive number (or unset for 1/steps), got {self.lr!r}")
        if not isinstance(self.clip_min, (int, float)) or not 0 < self.clip_min <= 1:
            raise LowbitError(f"signround clip_min must be in (0, 1] (1 turns clipping off), got {self.clip_min!r}")
        if self.compute not in COMPUTES:
            raise LowbitError(f"signround compute {self.compute!r} is unknown; use one of {', '.join(COMPUTES)}")
        if self.init not in INITS:
            raise LowbitError(f"signround init {self.init!r} is unknown; use one of {', '.join(INITS)}")

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        """Learn the rounding of ``data.layers`` on this block, then attach their QuantizedTensors.

        Returns the block's report: the keys trained (``layers``) and rounded to nearest,
        ``steps``, the block-output MSE on the guard's batches at the start and at the end, and
        which parameters were ``kept`` ("learned" or "start").
        """
        starts = _gptq_starts(block, data, self.damp) if self.init == "gptq" else {}

        def make(module: nn.Module, scheme: TensorScheme, layout: str, key: str) -> RoundingLinear:
            W = matrix_view(module.weight.detach().to(torch.float32), layout)  # (rows, cols)
            check_weight(W, scheme.weight, *W.shape, key)
            W, start = starts.get(key) or (W, Start(*initial_qparams(W, scheme.weight)))
            return RoundingLinear(module, scheme.weight, W, start, layout, key, self.clip_min)

        def fit(wrapped: list[Wrapped]) -> tuple[list[QuantizedTensor], dict[str, Any]]:
            guard = replace(data, calls=data.calls[:GUARD_BATCHES])
            params = [p for w in wrapped for p in w.layer.learned]
            train = (lambda: self._train(block, wrapped, data)) if self.steps else None
            before, after, learned = keep_better(lambda: block_loss(block, guard), params, train)
            return [w.layer.freeze() for w in wrapped], {
                "init": self.init, "steps": self.steps, "loss_before": before, "loss_after": min(after, before),
                "kept": "learned" if learned else "start"}

        return solve_wrapped(block, data, make, self.name, fit)

    def _train(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData) -> None:
        """``steps`` signed-gradient steps in place, one batch each, the step size decayed linearly."""
        bounds = [b for w in wrapped for b in w.layer.bounds]
        lr = self.lr if self.lr is not None else 1.0 / self.steps
        device = data.q_in[0].device.type
        with training(block, [p for p, _, _ in bounds]):
            for t, j in enumerate(batch_order(len(data.calls), self.steps)):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=self.compute == "bf16"):
                    out = data.calls[j].run(block, data.q_in[j])
                loss = mse(out, data.fp_out[j])
                for p, _, _ in bounds:
                    p.grad = None
                loss.backward()
                signed_step(bounds, lr * (1 - t / self.steps))

    def memory(self, work: BlockWork) -> int:
        """Bytes held while training one block.

        Per weight: the float32 copy being rounded, the offset with its gradient and the start
        snapshot (16 B), what the rounding graph keeps for the backward pass (shifted weight,
        reconstruction, scale derivative, zero derivative, the float32 in-range mask: 20 B) and, with
        ``compute="bf16"``, autocast's bf16 copy of the rounded weight (2 B). Per
        token of a batch: every layer's input and output in float32, twice (the backward pass).
        With ``init="gptq"``: every layer's (cols, cols) float32 Hessian.
        """
        weights = sum(r * c for r, c in work.layers)
        per_token = 2 * 4 * sum(r + c for r, c in work.layers)
        hessians = sum(4 * c * c for _, c in work.layers) if self.init == "gptq" else 0  # all gathered at once
        cast = 2 if self.compute == "bf16" else 0
        return weights * (4 + 16 + 20 + cast) + per_token * work.batch_tokens + hessians

    def flops(self, work: BlockWork) -> float:
        """``steps`` forward and backward passes of one batch through the layers (6·rows·cols per
        token), the rounding of every weight per step (about 30 operations per weight), and two
        scoring passes over all tokens (loss before and after); GPTQ's solve with init="gptq"."""
        weights = sum(r * c for r, c in work.layers)
        total = self.steps * (6 * weights * work.batch_tokens + 30 * weights) + 2 * 2 * weights * work.tokens
        if self.init == "gptq":
            total += sum(2 * work.tokens * c * c + 2 * r * c * c + 2 * c ** 3 for r, c in work.layers)
        return float(total)


def _gptq_starts(block: nn.Module, data: BlockData, damp: float) -> dict[str, tuple[Tensor, Start]]:
    """GPTQ's solution per Linear / Conv1D of ``data.layers``: key -> (its reconstruction
    (rows, cols) float32, its grids). The Hessians come from the quantized model's inputs run
    through the still-float block (every layer's at once, not layer after layer)."""
    from lowbit.models.targets import targets

    names = {id(m): n for n, m in block.named_modules()}
    known = {(t.module_name, t.param): t for t in targets(block)}
    todo = []
    for key, module, param, scheme in data.layers:
        target = known.get((names.get(id(module)), param))
        if target is not None and target.kind == "linear" and names.get(id(module)):
            todo.append((key, module, target.layout, scheme.weight))
    stats = {key: HessianStats(matrix_view(m.weight, layout).shape[1]) for key, m, layout, _ in todo}
    hooks = [m.register_forward_pre_hook(_hessian_hook(stats[key])) for key, m, layout, _ in todo]
    try:
        with torch.no_grad():
            for j, call in enumerate(data.calls):
                call.run(block, data.q_in[j])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    cfg = gptq_algo.GPTQ(damp=damp)
    for key, module, layout, spec in todo:
        W = matrix_view(module.weight.detach().to(torch.float32), layout)  # (rows, cols)
        gscale = spec.format.global_scale(W)
        r = cfg.solve(W, stats[key].H, spec, gscale)
        start = Start(r.scale, r.zero, r.global_scale)
        qt = pack_matrix(spec, tuple(W.shape), "rows", r.codes, r.scale, r.zero, r.global_scale)
        out[key] = (qt.dequantize().reshape(W.shape).to(torch.float32), start)
    return out


def _hessian_hook(stats: HessianStats):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        stats.update(x.reshape(-1, x.shape[-1]).to(torch.float32))  # (tokens, in_features)

    return hook
