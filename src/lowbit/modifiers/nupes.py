"""NUPES (Yvinec et al., "NUPES: Non-Uniform Post-Training Quantization via Power Exponent Search",
arXiv:2308.05600; its data-free predecessor "PowerQuant", arXiv:2301.09858), in two modes.

``mode="free"`` (the default, no data): per tensor, the power exponent ``a`` that minimizes
``||W − D(Q_a(W))||²`` (``lowbit.algorithms.nupes.search_exponent``), recorded in the spec as
``PowerFormat(bits, a)``.

``mode="data"`` (``--mode data``, with calibration data): a block solve
(``lowbit.modifiers._nupes_data``). Per block, every targeted Linear / GPT-2 Conv1D starts from
the data-free solution (its searched exponent, its codes) and learns, with Adam (the
gradient-based PTQ study's advice, shared/papers/METHODS.md §8), its exponent ``a`` and a free
offset per weight in the power domain (``lowbit.algorithms.nupes_data``), on the mean squared
error between the block's output on the quantized model's inputs and the float block's output.
Then each layer is frozen to codes on ``PowerFormat(bits, a_learned)``, its spec recording the
learned exponent as the data-free mode records its own.

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

from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.grid import PowerFormat
from lowbit.modifiers._nupes_data import searched, solve_data
from lowbit.modifiers.base import BlockData, BlockWork, LayerResult, Modifier, tensor_scale
from lowbit.quantizer import quantize_matrix
from lowbit.scheme import TensorScheme

MODES = ("free", "data")


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

    def outside(self) -> "NUPES | None":
        """Tensors outside the blocks (an untied lm_head) get the data-free mode's exponent search."""
        return replace(self, mode="free") if self.mode == "data" else None

    def check_scheme(self, scheme: TensorScheme) -> None:
        fmt = scheme.weight.format
        if not (isinstance(fmt, PowerFormat) or (fmt.family == "int" and fmt.symmetric)):
            raise LowbitError(f"method nupes needs a power or symmetric int format, not {fmt.name}; "
                              "try pow4_a0.5:g64")

    def solve_layer(self, W: Tensor, stats: Any, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult:
        """W (rows, cols) float32 -> codes on ``PowerFormat(bits, a)`` with this tensor's ``a``."""
        self.check_scheme(scheme)
        spec = searched(W, scheme.weight)
        gscale = tensor_scale(spec, W, global_scale)
        codes, scale, zero = quantize_matrix(W, spec, gscale)
        return LayerResult(spec, codes, scale, zero, gscale, info={"exponent": spec.format.a})

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        """Learn the exponents and offsets of ``data.layers`` on this block, then attach their
        QuantizedTensors. Returns the block's report: the keys trained (``layers``) and rounded
        to nearest, ``steps``, the block-output MSE over all batches at the start (the data-free
        solution) and at the end, which parameters were ``kept`` ("learned" or "start") and each
        trained tensor's ``exponents`` [start, end]."""
        return solve_data(block, data, self.steps, self.lr, self.exponent_lr)

    def memory(self, work: BlockWork) -> int:
        """Bytes held while training one block (0 in mode "free", beyond the engine's own).

        Per weight: the float32 copy, the offset with its gradient, Adam's two moments and the
        start's snapshot (24 B), and the rounding graph with its passes' temporaries (130 B).
        The graph keeps 36 B per weight for the backward pass (nine float32 tensors, counted
        with ``saved_tensors_hooks``), but the process grows far more: on SmolLM2's block 0 at
        pow3 g64 (3.5 M weights, 2 windows per step) training rose 570 MiB above the block's
        start, against 312 MiB forecast with 45 B here, and the whole run peaked 14% above its
        forecast (2065 MB against 1813). 130 B per weight covers that measurement; the float64
        temporaries of the power rounding and the allocator's retained blocks are the likely
        rest (not itemized). Per token of a batch: every layer's input and output in float32,
        twice (the backward pass).
        """
        if self.mode == "free":
            return 0
        weights = sum(r * c for r, c in work.layers)
        per_token = 2 * 4 * sum(r + c for r, c in work.layers)
        return weights * (24 + 130) + per_token * work.batch_tokens

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
