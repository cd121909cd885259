"""LSQ (Esser et al., "Learned Step Size Quantization", arXiv:1902.08153) as a block solve.

For each block, every targeted Linear / GPT-2 Conv1D weight is swapped for a
``lowbit.qat.FakeQuantLinear`` whose block scales start at the spec's own choice (so an
untrained block is round-to-nearest, bit for bit) and are learned with Adam (Kingma & Ba,
arXiv:1412.6980) through LSQ's gradient (``lowbit.qat.fakequant``). The loss is the mean squared
error between the block's output on the quantized model's inputs ``q_in`` and the float block's
outputs ``fp_out``: block-wise reconstruction as in BRECQ (Li et al., "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction", arXiv:2102.05426), where LSQ trains on the
task loss end to end. Then each layer is frozen to its ``QuantizedTensor`` and attached, with
the scheme's input spec, as ``engine.solve.apply_result`` attaches quantized results.

==================  ===============================================================
choice              value (and why)
==================  ===============================================================
a step              one calibration batch (the run's ``--batch-size`` windows)
                    through the block, forward and backward; batches in a
                    fixed-seed order, a fresh permutation per pass, so the same
                    inputs give the same bytes
learning rate       ``lr`` is relative, as in ``lowbit.qat.finetune``: each layer's
                    Adam step is ``lr`` times its mean initial scale; it decays to
                    zero along a cosine over the ``steps`` (LSQ's schedule)
what is kept        the learned scales if their loss over all batches is below the
                    start's, else the start (RTN); the block report says which
                    (a guard of ours, not the paper's)
input quantization  a scheme's dynamic input spec rounds each layer's input during
                    training too, with the rounding passed straight through
other tensors       fused experts and convolutions cannot be wrapped: rounded to
                    nearest, listed in the block report as ``rounded_to_nearest``
==================  ===============================================================

Formats whose scale LSQ cannot learn (MX's power-of-two scales, binary) are refused at planning,
for the schemes of the Linear / Conv1D layers it trains (``check_scheme``,
``lowbit.qat.check_learnable``); tensors it rounds to nearest may use any format.

Defaults, measured on SmolLM2-135M with uint4:g64 and 32 windows of 512 tokens (block-output
MSE after / before, blocks 0, 15 and 29): the gain follows the number of steps, hardly their
size, so small batches are cheaper: 40 steps of 2 windows reach 0.68, 0.53, 0.42 for a third of
the time of 40 steps of 8 windows (0.69, 0.53 on blocks 0, 15); 80 steps reach 0.63, 0.46 on
blocks 0 and 15. ``lr`` 2e-2 does no better than 1e-2 (0.69, 0.53, 0.37). A step of 2 windows
costs about 0.5 s of one core there, one of 8 windows 1.5 s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.modifiers._blockfit import Wrapped, batch_order, block_loss, keep_better, mse, solve_wrapped, training
from lowbit.modifiers.base import BlockData, BlockWork, Modifier
from lowbit.qat.fakequant import check_learnable
from lowbit.qat.layer import FakeQuantLinear
from lowbit.qtensor import QuantizedTensor
from lowbit.scheme import TensorScheme


def _make(module: nn.Module, scheme: TensorScheme, layout: str, key: str) -> FakeQuantLinear:
    return FakeQuantLinear(module, scheme.weight, learn_scale=True, layout=layout, name=key)


@dataclass(frozen=True)
class LSQ(Modifier):
    """Learned step sizes per block (module docstring); weights stay fixed unless ``train_weights``."""

    steps: int = 40  # Adam steps per block, one calibration batch each; 0 keeps RTN
    lr: float = 1e-2  # relative: a layer's scale learning rate is lr × its mean initial scale
    train_weights: bool = False  # also train the float weights (straight-through), at weight_lr
    weight_lr: float = 1e-5  # absolute learning rate of the weights

    name = "lsq"
    needs_data = True
    float_targets = True
    solves_kinds = frozenset({"linear"})  # fused experts and convolutions are rounded to nearest

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise LowbitError(f"lsq steps must be an integer >= 0 (0 keeps round-to-nearest), got {self.steps!r}")
        for name in ("lr", "weight_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise LowbitError(f"lsq {name} must be a positive number, got {value!r}")

    def check_scheme(self, scheme: TensorScheme) -> None:
        """Refuse, at planning, a weight format whose scale LSQ cannot learn (MX, binary)."""
        try:
            check_learnable(scheme.weight, "method lsq")
        except LowbitError as e:
            raise LowbitError(f"{e}; or quantize these layers with rtn or gptq (a recipe stage with targets)") from None

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        """Learn the scales of ``data.layers`` on this block, then attach their QuantizedTensors.

        Returns the block's report: the keys trained (``layers``) and rounded to nearest,
        ``steps``, the block-output MSE over all batches before and after (of what is stored),
        and which scales were ``kept`` ("learned" or "start").
        """
        return solve_wrapped(block, data, _make, self.name, lambda wrapped: self._fit(block, wrapped, data))

    def _fit(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData
             ) -> tuple[list[QuantizedTensor], dict[str, Any]]:
        """Score, train, score; the learned scales (and weights) are kept if the block error fell,
        or when untrained (``steps`` 0: RTN either way), else the start is put back."""
        params = [w.layer.scale for w in wrapped]  # starting at the spec's own (RTN) scale grids
        if self.train_weights:
            params += [w.layer.weight for w in wrapped]
        train = (lambda: self._train(block, wrapped, data)) if self.steps else None
        before, after, learned = keep_better(lambda: block_loss(block, data), params, train)
        kept = "learned" if learned or not self.steps else "start"
        return [w.layer.freeze() for w in wrapped], {
            "steps": self.steps, "loss_before": before, "loss_after": min(after, before), "kept": kept}

    def _train(self, block: nn.Module, wrapped: list[Wrapped], data: BlockData) -> None:
        """``steps`` Adam steps on the block-output MSE of one batch each, in place."""
        groups = []
        for w in wrapped:
            mean = float(w.layer.scale.detach().abs().mean())
            groups.append({"params": [w.layer.scale], "lr": self.lr * (mean if mean > 0 else 1.0)})
            if self.train_weights:
                groups.append({"params": [w.layer.weight], "lr": self.weight_lr})
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
        with training(block, [p for g in groups for p in g["params"]]):
            for j in batch_order(len(data.calls), self.steps):
                out = data.calls[j].run(block, data.q_in[j])  # (B, T, hidden)
                loss = mse(out, data.fp_out[j])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()

    def memory(self, work: BlockWork) -> int:
        """Bytes held while training one block.

        Per weight: the learned scale with its gradient and Adam's two moments, counted as if
        every weight had its own scale (an upper bound: 16 B), plus what the fake-quant graph
        keeps for the backward pass (float32 copy, reconstruction, scale derivative, in-range
        mask: 13 B); with ``train_weights`` the weight's gradient and moments (12 B) too. Per
        token of a batch: every layer's input and output in float32, twice (what the backward
        pass keeps of the block's forward).
        """
        weights = sum(r * c for r, c in work.layers)
        per_weight = 16 + 13 + (12 if self.train_weights else 0)
        per_token = 2 * 4 * sum(r + c for r, c in work.layers)
        return weights * per_weight + per_token * work.batch_tokens

    def flops(self, work: BlockWork) -> float:
        """``steps`` forward and backward passes of one batch through the layers (about three
        forwards, 6·rows·cols per token), the fake quantization of every weight per step (about
        20 operations per weight), and two scoring passes over all tokens (loss before and after)."""
        weights = sum(r * c for r, c in work.layers)
        return float(self.steps * (6 * weights * work.batch_tokens + 20 * weights) + 2 * 2 * weights * work.tokens)
