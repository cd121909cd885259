"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization",
arXiv:2004.10568) as a block solve: learned up-or-down rounding of every weight, on any format
(``lowbit.algorithms.adaround`` has the rounding itself and its generalisation to non-uniform grids).

Every targeted Linear / GPT-2 Conv1D weight of a block is swapped for a wrapper holding one
rounding variable ``V`` per weight, started so that the soft reconstruction is the weight itself.
The scale (and zero) stay at the spec's own choice (min-max, clip search, HQQ's zero for ``:hqq``
specs). Then ``steps`` optimizer steps, one calibration batch each, minimise

    reconstruction error + reg · Σ(1 − |2h(V) − 1|^β)      (β: 20 → 2 after 20% warm-up)

and each weight is rounded hard (up where ``V >= 0``) and stored as the ``QuantizedTensor``
that ``quantize_with`` / ``pack_matrix`` give for those codes and the spec's scales.

==================  ===============================================================
choice              value (and why)
==================  ===============================================================
``scope`` "block"   the block's output on the quantized model's inputs ``q_in``
                    against the float block's outputs (BRECQ, Li et al.,
                    arXiv:2102.05426), all its layers at once
``scope`` "layer"   each layer's output against the float layer on the same
                    inputs: the inputs the layer receives in the quantized model,
                    caught in one forward of the block with every targeted layer
                    rounded to nearest (a guess: earlier layers of the block are
                    at round-to-nearest there, not at their learned rounding)
reconstruction      squared error summed over output features, mean over tokens
                    (BRECQ's ``lp_loss``; a guess at the paper's norm)
optimizer           Adam (the paper's; MetaAug's ``lr_bit`` 1e-3) or plain SGD
                    (``optimizer="sgd"``, for shared/papers §8's comparison)
batches             a fixed-seed order, a fresh permutation per pass (``batch_order``)
what is kept        the learned rounding if its block-output loss over all batches
                    is below round-to-nearest's, else round to nearest; the block
                    report says which (a guard of ours, as in LSQ)
other tensors       fused experts and convolutions: rounded to nearest, listed as
                    ``rounded_to_nearest``
==================  ===============================================================

Defaults: ``reg`` 0.01 and ``lr`` 1e-3 are the paper's and MetaAug's; ``steps`` 200 is a guess (the
paper runs 10k–20k iterations per layer). With ``lr`` 1e-3 Adam moves ``V`` by at most about
``steps·lr``, so only weights within about that of a tie (|V| small) can change side; raise ``lr``
for short runs. Binary formats are refused at planning: sign codes have no up/down step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms.adaround import beta_at, grid_pair, rectified_sigmoid, regularizer, soft
from lowbit.errors import LowbitError
from lowbit.modifiers._blockfit import Wrapped, batch_order, block_loss, forward_with, solve_wrapped, training
from lowbit.modifiers.base import BlockData, BlockWork, Modifier
from lowbit.qat.fakequant import initial_qparams, store_scale
from lowbit.qtensor import QuantizedTensor, matrix_view
from lowbit.quantizer import check_weight, pack_matrix
from lowbit.scheme import TensorScheme
from lowbit.spec import QuantSpec

_REFUSED = {"binary": "binary codes are sign(x): there is no rounding step to go up or down"}
_MODES = ("soft", "hard", "start")


class AdaRoundLinear(nn.Module):
    """Wraps ``inner`` (``nn.Linear`` (out, in) or GPT-2 ``Conv1D`` (in, out)) and computes with the
    rounded weight: ``mode`` "soft" (lo + h(V)·(hi − lo), differentiable in V), "hard" (the
    learned rounding, what ``freeze`` stores) or "start" (the format's own round-to-nearest).

    V: (rows, cols) float32 Parameter on the matrix view; the float weight is never changed.
    """

    def __init__(self, inner: nn.Module, spec: QuantSpec, layout: str = "rows", name: str = "weight") -> None:
        super().__init__()
        w = inner.weight
        m = matrix_view(w.detach().to(torch.float32), layout)  # (rows, cols)
        check_weight(m, spec, *m.shape, name)
        scale, zero, gscale = initial_qparams(m, spec)
        self.inner, self.spec, self.layout, self.name, self.mode = inner, spec, layout, name, "soft"
        self.stored = store_scale(scale, spec)
        self.zero, self.global_scale = zero, gscale
        self.pair = grid_pair(m, spec, self.stored, zero, gscale)
        self.V = nn.Parameter(self.pair.start())

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def h(self) -> Tensor:
        """h(V), (rows, cols) float32."""
        return rectified_sigmoid(self.V)

    def matrix(self) -> Tensor:
        """The (rows, cols) float32 reconstruction of the current mode."""
        p = self.pair
        if self.mode == "soft":
            return soft(p.lo, p.hi, self.V)
        if self.mode == "hard":
            return p.hard(self.V.detach())
        return torch.where(p.near == p.up, p.hi, p.lo)

    def forward(self, *args, **kwargs):
        return forward_with(self.inner, self.matrix(), self.layout, args, kwargs)

    @torch.no_grad()
    def freeze(self, learned: bool = True) -> QuantizedTensor:
        """The ``QuantizedTensor`` of the hard rounding (``learned``) or of round-to-nearest."""
        codes = self.pair.codes(self.V.detach()) if learned else self.pair.near
        zero = None if self.zero is None else self.zero.clone()
        gscale = None if self.global_scale is None else self.global_scale.clone()
        return pack_matrix(self.spec, tuple(self.weight.shape), self.layout, codes, self.stored.clone(), zero, gscale)


def _make(module: nn.Module, scheme: TensorScheme, layout: str, key: str) -> AdaRoundLinear:
    return AdaRoundLinear(module, scheme.weight, layout, key)


def _set_mode(wrapped: list[Wrapped], mode: str) -> None:
    for w in wrapped:
        w.layer.mode = mode


def _reconstruction(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over the last (feature) axis, mean over the rest; float32."""
    return (out.float() - target.float()).pow(2).sum(-1).mean()


@dataclass(frozen=True)
class AdaRound(Modifier):
    """Learned up-or-down rounding per block or per layer (module docstring)."""

    steps: int = 200  # optimizer steps per block (scope "block") or per layer ("layer"); 0 keeps RTN
    lr: float = 1e-3  # learning rate of V (Adam, or SGD)
    reg: float = 0.01  # λ, the weight of the rounding regularizer
    optimizer: str = "adam"  # "adam" | "sgd"
    scope: str = "block"  # "block" | "layer"

    name = "adaround"
    needs_data = True
    float_targets = True
    solves_kinds = frozenset({"linear"})

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise LowbitError(f"adaround steps must be an integer >= 0 (0 keeps round-to-nearest), got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise LowbitError(f"adaround lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.reg, (int, float)) or not self.reg >= 0:
            raise LowbitError(f"adaround reg must be a number >= 0, got {self.reg!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise LowbitError(f"adaround optimizer {self.optimizer!r} is not allowed; use 'adam' or 'sgd'")
        if self.scope not in ("block", "layer"):
            raise LowbitError(f"adaround scope {self.scope!r} is not allowed; use 'block' or 'layer'")

    def check_scheme(self, scheme: TensorScheme) -> None:
        """Refuse, at planning, a format without an up/down rounding step (binary)."""
        fmt = scheme.weight.format
        if fmt.family in _REFUSED:
            raise LowbitError(f"method {self.name} cannot round {fmt.name}: {_REFUSED[fmt.family]}; quantize these "
                              "layers with rtn (a recipe stage with targets) or choose a format with 2 bits or more")

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        """Learn the rounding of ``data.layers`` on this block, then attach their QuantizedTensors.

        Returns the block's report: the keys trained (``layers``) and rounded to nearest,
        ``steps``, ``scope``, the block-output MSE over all batches at round-to-nearest
        (``loss_before``) and of what is stored (``loss_after``), and ``kept`` ("learned" or
        "start"); with ``scope`` "layer", the layer losses before and after too.
        """
        return solve_wrapped(block, data, _make, self.name, lambda wrapped: self._fit(block, wrapped, data))

    def _fit(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData
             ) -> tuple[list[QuantizedTensor], dict[str, Any]]:
        """Score round-to-nearest, train, score the hard rounding; freeze the better of the two."""
        info: dict[str, Any] = {}
        _set_mode(wrapped, "start")
        before = block_loss(block, data)
        if self.steps and self.scope == "layer":
            info["layer_losses"] = self._train_layers(block, wrapped, data)
        elif self.steps:
            info.update(self._train_block(block, wrapped, data) or {})
        _set_mode(wrapped, "hard")
        after = block_loss(block, data)
        learned = after < before
        return [w.layer.freeze(learned) for w in wrapped], {
            **info, "steps": self.steps, "scope": self.scope, "loss_before": before,
            "loss_after": min(after, before), "kept": "learned" if learned else "start"}

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        return cls(params, lr=self.lr)

    def _step(self, optimizer: torch.optim.Optimizer, loss: Tensor, layers: list[AdaRoundLinear], step: int) -> None:
        beta = beta_at(step, self.steps)
        if beta is not None and self.reg:
            loss = loss + self.reg * sum(regularizer(layer.h(), beta) for layer in layers)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def _train_block(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData) -> None:
        """``steps`` steps on the block-output error of one batch each, in soft mode."""
        layers = [w.layer for w in wrapped]
        optimizer = self._optimizer([layer.V for layer in layers])
        _set_mode(wrapped, "soft")
        with training(block, [layer.V for layer in layers]):
            for step, j in enumerate(batch_order(len(data.calls), self.steps)):
                out = data.calls[j].run(block, data.q_in[j])  # (B, T, hidden)
                self._step(optimizer, _reconstruction(out, data.fp_out[j]), layers, step)

    def _train_layers(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData) -> list[list[float]]:
        """Each layer on its own: ``steps`` steps on its output error against the float layer, on
        the inputs caught with the block at round to nearest. Returns [before, after] per layer."""
        inputs = _caught_inputs(block, wrapped, data)
        losses = []
        for w, xs in zip(wrapped, inputs):
            layer = w.layer
            optimizer = self._optimizer([layer.V])
            with torch.no_grad():
                targets = [layer.inner(x) for x in xs]  # the float layer on the same inputs
            before = _layer_loss(layer, xs, targets, "start")
            layer.mode = "soft"
            with training(block, [layer.V]):
                for step, j in enumerate(batch_order(len(xs), self.steps)):
                    self._step(optimizer, _reconstruction(layer.forward(xs[j]), targets[j]), [layer], step)
            losses.append([before, _layer_loss(layer, xs, targets, "hard")])
        return losses

    def memory(self, work: BlockWork) -> int:
        """Bytes held while training one block.

        Per weight: lo, hi and V (12 B), V's gradient and Adam's two moments (12 B), the three
        codes (3 B), and what the soft graph keeps for the backward pass (σ(V), h, the
        reconstruction and its copy in the weight's shape: 16 B). Per token of a batch: every
        layer's input and output in float32, twice (the backward pass). With ``scope`` "layer",
        every layer's inputs over all calibration tokens, float32.
        """
        weights = sum(r * c for r, c in work.layers)
        per_token = 2 * 4 * sum(r + c for r, c in work.layers)
        caught = 4 * sum(c for _, c in work.layers) * work.tokens if self.scope == "layer" else 0
        return weights * 43 + per_token * work.batch_tokens + caught

    def flops(self, work: BlockWork) -> float:
        """``steps`` forward and backward passes of one batch through the layers (6·rows·cols per
        token), the soft rounding and regularizer of every weight per step (about 30 operations),
        and two scoring passes over all tokens (loss before and after); per layer with ``scope``
        "layer", hence the same count."""
        weights = sum(r * c for r, c in work.layers)
        return float(self.steps * (6 * weights * work.batch_tokens + 30 * weights) + 2 * 2 * weights * work.tokens)


def _caught_inputs(block: nn.Module, wrapped: list[Wrapped], data: BlockData) -> list[list[Tensor]]:
    """Per wrapped layer, per batch, its input (as the layer sees it, input rounding included)
    in one forward of the block on ``q_in`` with every wrapped layer at round to nearest."""
    caught: list[list[Tensor]] = [[] for _ in wrapped]
    hooks = [w.layer.register_forward_pre_hook(lambda m, a, i=i: caught[i].append(a[0].detach()))
             for i, w in enumerate(wrapped)]
    _set_mode(wrapped, "start")
    try:
        with torch.no_grad():
            for j, call in enumerate(data.calls):
                call.run(block, data.q_in[j])
    finally:
        for h in hooks:
            h.remove()
    return caught


def _layer_loss(layer: AdaRoundLinear, xs: list[Tensor], targets: list[Tensor], mode: str) -> float:
    """Mean squared error of the layer's outputs in ``mode`` against ``targets``, over all batches."""
    layer.mode = mode
    total, count = 0.0, 0
    with torch.no_grad():
        for x, t in zip(xs, targets):
            out = layer.forward(x).float()  # x is rounded already: no input hook
            total += float((out - t.float()).pow(2).sum())
            count += out.numel()
    return total / max(count, 1)
