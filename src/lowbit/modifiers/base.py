"""The modifier protocol: what every compression method may do, as optional hooks.

A modifier is a frozen dataclass whose fields are the method's options (the CLI builds its
``--damp``-style flags from them). The engine calls the hooks it finds; the base class gives
every hook a do-nothing default, so a method implements only what it needs:

=================  ===================================================================
hook               when the engine calls it
=================  ===================================================================
``check_scheme``   at planning, once per distinct scheme a stage acts on: raise
                   ``LowbitError`` for a scheme the method cannot produce
``allocate``       at planning, with the model and the stage's (target, scheme) pairs:
                   returns the pairs the stage will solve, each with its own scheme
                   (layer-adaptive sparsity); default: unchanged
``prepare``        once, on the whole model, before any block (data-free transforms)
``new_stats``      per targeted layer while its block runs on calibration data; returns
                   an accumulator with ``update(x)``, x (tokens, in_features)
``solve_layer``    per targeted layer: the float32 matrix view W (rows, cols), its
                   statistics (None without data) and its scheme -> ``LayerResult``
``refine_layer``   (``refines`` methods, instead of ``solve_layer``) per targeted layer
                   that an earlier stage quantized: the float32 matrix view W it was
                   quantized from, its ``QuantizedTensor`` and scheme -> the new
                   ``QuantizedTensor`` (LoRC adds low-rank factors)
``solve_block``    per block, with the float block's inputs and outputs and the
                   quantized model's inputs (``BlockData``); changes the block in place
``outside``        (block solves) the data-free method for targeted tensors outside the
                   repeated blocks; default None: rounded to nearest
``memory``         bytes the method holds for a block (``BlockWork``: its layers'
                   (rows, cols), the calibration tokens); feeds the forecast
``flops``          floating-point operations of the method's own work on a block (not
                   the engine's forwards); feeds the time forecast
=================  ===================================================================

Class attributes tell the engine what a method is:

* ``needs_data``: it needs calibration data (statistics or block solves);
* ``float_targets``: ``solve_block`` needs the float model's block outputs (the engine then
  keeps a float generation of hidden states beside the quantized one);
* ``produces``: the parts of a ``TensorScheme`` it writes ("weight", "sparsity");
  a recipe whose scheme asks for a part no stage produces is refused;
* ``requires``: the parts a layer's scheme must have for the method to act on it;
* ``changes_float``: it changes float weights in place (pruning, folding, biases), so a
  checkpoint must keep the block's float tensors too;
* ``float_weights``: ``solve_block`` needs the float weights its targets were quantized from
  (the engine keeps them beside the quantized tensors: ``lowbit.nn.reference.kept_float``; bias
  correction after a quantizer);
* ``solves_kinds``: the target kinds it solves itself (None: every kind); ``check_scheme`` is
  asked only about their schemes (LSQ rounds fused experts and convolutions to nearest);
* ``batch_windows``: the calibration windows per forward it runs best with, used when the run
  does not set ``--batch-size`` (a trained block solve takes one batch per step);
* ``keeps_mask``: its ``solve_layer`` takes ``keep=`` (rows, cols) bool, the keep-mask an earlier
  pruning stage recorded, and keeps pruned weights at zero while it solves (GPTQ); the engine
  passes it only when there is one. Other methods solve as if dense; the mask still zeroes the
  pruned weights of what they produce.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.scheme import TensorScheme
from lowbit.spec import QuantSpec


@dataclass
class LayerResult:
    """What ``solve_layer`` gives back for one (rows, cols) matrix view.

    A quantized weight: ``codes`` (rows, cols) uint8 with ``scale`` / ``zero`` grids as
    ``lowbit.quantizer.quantize_matrix`` returns them, the ``global_scale`` used and the
    ``spec`` they follow (a method may refine it, as NUPES records its exponent).
    A float weight (pruning without quantization): ``weight`` (rows, cols) float32.
    ``mask``: (rows, cols) bool, True where a weight is kept (pruning methods).
    ``info``: JSON-able numbers for the run report (loss, damp, tokens, ...).
    """

    spec: QuantSpec | None = None
    codes: Tensor | None = None
    scale: Tensor | None = None
    zero: Tensor | None = None
    global_scale: Tensor | None = None
    weight: Tensor | None = None
    mask: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.codes is not None


@dataclass
class BlockData:
    """What ``solve_block`` sees for one block.

    calls:   how the block is called per batch (``lowbit.engine.capture.BlockCall``); run the
             block on hidden states h with ``calls[j].run(block, h)``.
    fp_in:   per batch, the float model's hidden states entering this block (or None when no
             stage asked for float targets), each (B, T, hidden).
    q_in:    per batch, the quantized model's hidden states entering this block.
    fp_out:  per batch, the float block's outputs on ``fp_in`` (computed before any stage
             changed the block), or None.
    layers:  (key, module, param, scheme) of the block's targeted tensors for this stage.
    """

    calls: list
    q_in: Any
    fp_in: Any = None
    fp_out: Any = None
    layers: list[tuple[str, nn.Module, str, TensorScheme]] = field(default_factory=list)


@dataclass(frozen=True)
class BlockWork:
    """What a method solves in one block, for its ``memory`` and ``flops`` estimates.

    layers:       (rows, cols) of each targeted matrix of the block;
    tokens:       calibration tokens over the whole run (windows × sequence length);
    batch_tokens: tokens per forward (batch size × sequence length).
    """

    layers: tuple[tuple[int, int], ...]
    tokens: int = 0
    batch_tokens: int = 0


@dataclass(frozen=True)
class Modifier:
    """Base of every method; see the module docstring for the hooks."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False
    float_targets: ClassVar[bool] = False
    produces: ClassVar[frozenset[str]] = frozenset({"weight"})
    requires: ClassVar[frozenset[str]] = frozenset({"weight"})
    changes_float: ClassVar[bool] = False
    float_weights: ClassVar[bool] = False
    solves_kinds: ClassVar[frozenset[str] | None] = None
    keeps_mask: ClassVar[bool] = False
    batch_windows: ClassVar[int | None] = None
    refines: ClassVar[bool] = False

    def check_scheme(self, scheme: TensorScheme) -> None:
        """Raise ``LowbitError`` if this method cannot produce ``scheme``. Default: any scheme."""

    @property
    def reads_all_weights(self) -> bool:
        """Whether ``allocate`` reads every targeted weight at planning (then the run cannot stream
        weights from disk). Default: no."""
        return False

    def allocate(self, model: nn.Module, pairs: list, batches: list | None = None, progress: bool = True) -> list:
        """The (target, scheme) pairs this stage solves, given the planned ones and the run's
        calibration batches (None in a data-free run). Default: unchanged."""
        return pairs

    def prepare(self, model: nn.Module) -> None:
        """Whole-model, data-free preparation (folding, rotations). Default: nothing."""

    def new_stats(self, cols: int) -> Any | None:
        """An accumulator for a layer with ``cols`` inputs, or None (no statistics)."""
        return None

    def solve_layer(self, W: Tensor, stats: Any, scheme: TensorScheme, key: str,
                    global_scale: Tensor | None = None) -> LayerResult | None:
        """The new weight of one layer; None leaves it as it is.

        global_scale: the tensor scale to use (fused experts share their tensor's); None means
        the format's own choice for W (``tensor_scale``).
        """
        return None

    def refine_layer(self, W: Tensor, qt: Any, scheme: TensorScheme, key: str) -> Any:
        """(``refines`` methods) W (rows, cols) float32, the weight an earlier stage quantized to
        ``qt`` (a ``QuantizedTensor``) -> the ``QuantizedTensor`` to attach instead."""
        raise LowbitError(f"method {self.name} does not refine quantized weights")

    def solve_block(self, block: nn.Module, data: BlockData) -> dict[str, Any] | None:
        """Change ``block`` in place; returns report numbers or None. Default: nothing.

        The engine reads two lists of keys from the returned numbers: ``layers``, the tensors it
        solved (each counted as solved), and ``rounded_to_nearest``, those it rounded to nearest
        instead (each reported as a fallback).
        """
        return None

    def outside(self) -> "Modifier | None":
        """(block-solving methods) The data-free method that solves the targeted tensors outside
        the repeated blocks (an untied lm_head), where no block data exists. Default None: they
        are rounded to nearest and reported as fallbacks."""
        return None

    def memory(self, work: BlockWork) -> int:
        """Bytes this method holds while solving one block. Default: nothing."""
        return 0

    def flops(self, work: BlockWork) -> float:
        """Floating-point operations of this method's own work on one block (the engine's
        forward passes are counted by the forecast). Default: none worth counting."""
        return 0.0

    @property
    def has_layer_solve(self) -> bool:
        return type(self).solve_layer is not Modifier.solve_layer

    @property
    def has_block_solve(self) -> bool:
        return type(self).solve_block is not Modifier.solve_block

    def options(self) -> dict[str, Any]:
        """The method's options as given (its dataclass fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def tensor_scale(spec: QuantSpec, W: Tensor, given: Tensor | None) -> Tensor | None:
    """``given``, or the format's global scale of W (NVFP4's fp32 tensor scale; None for most)."""
    return given if given is not None else spec.format.global_scale(W)


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The option fields of a modifier class (what the CLI and recipes may set)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def build(cls: Callable[..., Modifier], name: str, options: dict[str, Any]) -> Modifier:
    """``cls(**options)``, with unknown options named in the error."""
    known = {f.name for f in option_fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise LowbitError(f"method {name} has no option {', '.join(map(repr, unknown))}; its options: {allowed}")
    try:
        return cls(**options)
    except TypeError as e:
        raise LowbitError(f"method {name}: {e}") from None
