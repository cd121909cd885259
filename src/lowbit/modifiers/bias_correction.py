"""Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", arXiv:1906.04721, §4.2's empirical variant; Finkelstein et al., "Fighting
Quantization Bias With Bias", arXiv:1906.03193) as a stage after a quantizing one:
``rtn+bias-correction``, ``gptq+bias-correction``.

For each quantized Linear / GPT-2 Conv1D of a block, with ``W`` its float weight (as it was before
any stage changed the block), ``Ŵ`` the quantized one and ``x`` the inputs the layer receives in
the quantized model on the calibration data, the bias grows by the expected output error per
output channel::

    b += E[W x] − E[Ŵ x̃] = W·mean(x) − Ŵ·mean(x̃)      (out,)

where ``x̃`` is ``x`` after the scheme's input quantization (``x̃ = x`` without one). After it, the
mean output error of the layer over those inputs is zero in every channel. A layer without a bias
gets one (``lowbit.nn.reference.add_bias``): ``lowbit.save`` writes it and ``lowbit.load``
restores it; transformers' ``from_pretrained`` on a config without biases (``attention_bias``,
``mlp_bias``) and the exports do not know of it.

How much of the correction each layer takes (``shrink``): the full correction is the paper's,
and on a transformer it over-corrects. On SmolLM2-135M, uint4:g128 after round to nearest, 32
pydoc windows, perplexity as a multiple of fp32's on pydoc / prose (16 windows each):

==========================================  =================
correction                                  pydoc / prose
==========================================  =================
none (round to nearest)                     1.359 / 1.304
full, every layer (``shrink=1``)            1.356 / 1.402
half, every layer (``shrink=0.5``)          1.244 / 1.236
full, q/k/gate/up only                      1.278 / 1.248
full, v/o/down only                         1.457 / 1.460
full, o/down only                           1.315 / 1.302
searched per layer (``shrink="auto"``)      1.209 / 1.243
==========================================  =================

(``python3 bench/bias_correction.py``; on 64 windows per corpus the search gives 1.191 / 1.219,
``bench/learned_paired.py``.)

The value projection's correction is the harmful one: its mean output over tokens is not what
attention passes on, a softmax-weighted average that on this model leans on the first token. So
the default, ``shrink="auto"``, lets the data decide per layer: in block order, each layer takes
0, half or all of its correction, whichever gives the block's output the lowest mean squared
error against the float block's on the first ``GUARD_WINDOWS`` calibration windows (the loss
SignRound's guard uses). A number applies that fraction to every layer without a search.

Choices of ours: the input means are taken in one forward of the block, before any layer of the
block is corrected (a correction of an earlier layer shifts a later layer's inputs slightly);
the sums are accumulated in float64. The candidate fractions {0, ½, 1} are ours. Fused experts and
convolutions are left alone and listed as ``not_corrected``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.targets import targets
from lowbit.modifiers._blockfit import block_loss
from lowbit.modifiers.base import BlockData, BlockWork, Modifier
from lowbit.nn.reference import add_bias, drop_added_bias, kept_float, qtensors
from lowbit.qtensor import matrix_view


class _Mean:
    """Running float64 sum of (tokens, features) rows and their count."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def update(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, features)
        s = rows.sum(0)
        self.total = s if self.total is None else self.total + s
        self.count += rows.shape[0]

    def value(self) -> Tensor:
        return self.total / max(self.count, 1)


def correction(W: Tensor, W_hat: Tensor, x_mean: Tensor, x_hat_mean: Tensor) -> Tensor:
    """W·mean(x) − Ŵ·mean(x̃): (out,) float64 from (out, in) matrices and (in,) means."""
    return W.double() @ x_mean.double() - W_hat.double() @ x_hat_mean.double()


#: calibration windows the per-layer fractions are scored on (the first batches that hold them)
GUARD_WINDOWS = 8
#: the fractions of its correction a layer may take under ``shrink="auto"``
FRACTIONS = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class BiasCorrection(Modifier):
    """Per-output-channel bias correction after a quantizing stage (module docstring)."""

    shrink: float | str = "auto"  # "auto": 0, ½ or all of it per layer by the block's error; a number: that fraction

    name = "bias-correction"
    needs_data = True
    float_weights = True
    changes_float = True
    produces = frozenset()
    solves_kinds = frozenset({"linear"})

    def __post_init__(self) -> None:
        if self.shrink == "auto":
            return
        if isinstance(self.shrink, bool) or not isinstance(self.shrink, (int, float)) or not 0 <= self.shrink <= 1:
            raise LowbitError(f"bias-correction shrink must be 'auto' or a number in [0, 1] (1 is the full "
                              f"correction), got {self.shrink!r}")

    @property
    def float_targets(self) -> bool:  # type: ignore[override]  # the search scores against the float block
        return self.shrink == "auto"

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        """Correct the biases of ``data.layers``; returns ``layers`` corrected, ``not_corrected``,
        the largest |correction| relative to the output's mean |W·mean(x)| (``relative``), the
        fraction each layer took (``shrink``) and, with the search, the guard's block error before
        and after (``loss_before``, ``loss_after``)."""
        names = {id(m): n for n, m in block.named_modules()}
        layouts = {(t.module_name, t.param): t for t in targets(block)}
        todo, skipped = [], []
        for key, module, param, _ in data.layers:
            target = layouts.get((names.get(id(module)), param))
            if target is None or target.kind != "linear" or param != "weight":
                skipped.append(key)
                continue
            if param not in qtensors(module):
                raise LowbitError(f"{key} is not quantized yet: bias-correction corrects what an earlier stage "
                                  "quantized, so put it after a quantizing stage (e.g. --method rtn+bias-correction)")
            todo.append((key, module, target.layout))
        info: dict[str, Any] = {"layers": [k for k, _, _ in todo]}
        if skipped:
            info["not_corrected"] = skipped
        if not todo:
            return info
        raw, seen = _input_means(block, [m for _, m, _ in todo], data)
        fixes = []
        for (key, module, layout), x, x_hat in zip(todo, raw, seen):
            W = kept_float(module, "weight")  # (out, in) float32, what the earlier stage quantized
            if W is None:
                raise LowbitError(f"{key}: its float weight was not kept for bias-correction; run the quantizing "
                                  "method and it in one recipe (e.g. rtn+bias-correction)")
            W_hat = matrix_view(module.weight.detach().to(torch.float32), layout)
            c = correction(W, W_hat, x.value(), x_hat.value())  # (out,)
            scale = float((W.double() @ x.value()).abs().mean())
            fixes.append((key, module, c, float(c.abs().max()) / scale if scale > 0 else 0.0))
        if self.shrink == "auto":
            guard = replace(data, calls=data.calls[:_guard_batches(data.q_in)])
            before = block_loss(block, guard)
            taken, after = _search(block, guard, fixes, before)
            info.update(loss_before=before, loss_after=after)
        else:
            taken = {key: float(self.shrink) for key, _, _, _ in fixes}
            for key, module, c, _ in fixes:
                _add(module, c, taken[key])
        return {**info, "relative": max(r for _, _, _, r in fixes), "shrink": taken}

    def memory(self, work: BlockWork) -> int:
        """The float copies of the block's targeted weights (float32, 4 B each), two float64 input
        means per layer and one batch's layer inputs in float64 for the sums; with the search, one
        batch's block output in float32."""
        weights = sum(r * c for r, c in work.layers)
        out = 4 * max(r for r, _ in work.layers) * work.batch_tokens if self.shrink == "auto" else 0
        return 4 * weights + 8 * sum(2 * c + work.batch_tokens for _, c in work.layers) + out

    def flops(self, work: BlockWork) -> float:
        """Two matrix-vector products per layer and a sum over every calibration input; with the
        search, two scored forwards of the guard's batches per layer and one more."""
        base = sum(4 * r * c + 2 * c * work.tokens for r, c in work.layers)
        if self.shrink != "auto":
            return float(base)
        guard = min(work.tokens, max(work.batch_tokens, GUARD_WINDOWS * 512))  # windows of 512 tokens: an estimate
        return float(base + (2 * len(work.layers) + 1) * 2 * sum(r * c for r, c in work.layers) * guard)


def _guard_batches(q_in: Any) -> int:
    """How many of the first batches hold ``GUARD_WINDOWS`` windows (at least one)."""
    count = windows = 0
    while count < len(q_in) and windows < GUARD_WINDOWS:
        windows += q_in[count].shape[0]
        count += 1
    return max(count, 1)


def _add(module: nn.Module, c: Tensor, fraction: float) -> None:
    """The layer's bias grows by ``fraction·c`` (a bias is added if it has none; none for 0)."""
    if fraction == 0:
        return
    bias = add_bias(module)
    with torch.no_grad():
        bias.add_((fraction * c).to(bias.dtype))


def _search(block: nn.Module, guard: BlockData, fixes: list, best: float) -> tuple[dict[str, float], float]:
    """In block order, give each layer the fraction of ``FRACTIONS`` of its correction ``c`` that
    scores lowest on ``guard`` (``block_loss``; ``best`` is the score before), keeping the earlier
    layers' choices; returns (key -> fraction, the final score). Ties keep the smaller fraction."""
    taken = {}
    for key, module, c, _ in fixes:
        bias = add_bias(module)
        start = bias.detach().clone()
        choice = 0.0
        for fraction in FRACTIONS[1:]:
            with torch.no_grad():
                bias.copy_(start + (fraction * c).to(bias.dtype))
            loss = block_loss(block, guard)
            if loss < best:
                best, choice = loss, fraction
        with torch.no_grad():
            bias.copy_(start + (choice * c).to(bias.dtype))
        if choice == 0:
            drop_added_bias(module)  # a layer left as it was keeps no zero bias (exports refuse added ones)
        taken[key] = choice
    return taken, best


def _input_means(block: nn.Module, modules: list[nn.Module], data: BlockData) -> tuple[list[_Mean], list[_Mean]]:
    """Per module, the mean of its input before and after its input quantization hook, over one
    forward of the block on every batch of ``q_in``."""
    raw, seen = [_Mean() for _ in modules], [_Mean() for _ in modules]
    hooks = []
    for m, r, s in zip(modules, raw, seen):
        hooks.append(m.register_forward_pre_hook(lambda _m, a, r=r: r.update(a[0]), prepend=True))
        hooks.append(m.register_forward_pre_hook(lambda _m, a, s=s: s.update(a[0])))
    try:
        with torch.no_grad():
            for j, call in enumerate(data.calls):
                call.run(block, data.q_in[j])
    finally:
        for h in hooks:
            h.remove()
    return raw, seen
