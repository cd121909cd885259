"""The outline every trained block solve shares (LSQ, SignRound, AdaRound and MetaAug, NUPES's
data mode): wrap the block's layers, train with gradients on the chosen parameters only, score
the block, keep the better of start and result, freeze, put the layers back.

``solve_wrapped`` is the outline: it swaps each targeted Linear / GPT-2 Conv1D of a block for a
trainable wrapper (``wrap``, with a ``make`` callable that builds the wrapper), lets the method's
``fit`` train the wrappers and freeze each to its ``QuantizedTensor``, then puts the original
modules back (``put``, even when ``fit`` fails) with those attached (``attach_frozen``). Tensors
that cannot be wrapped (fused experts, convolutions) are rounded to nearest by ``wrap`` and
listed for the report. Inside ``fit`` the methods share ``training`` (gradients on the trained
parameters only), ``batch_order``, ``mse`` and ``block_loss`` (the training loss and the block
error), ``keep_better`` with ``snapshot`` / ``restore`` (train, and go back to the start unless the
block error fell), and ``forward_with`` (a wrapper's forward with its weight replaced).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lowbit.errors import LowbitError
from lowbit.models.targets import targets
from lowbit.modifiers.base import BlockData
from lowbit.nn.activation import quantize_input
from lowbit.nn.reference import attach, qtensors
from lowbit.qtensor import QuantizedTensor, from_matrix
from lowbit.quantizer import quantize_weight
from lowbit.scheme import ActSpec, TensorScheme

#: make(module, scheme, layout, key) -> the trainable wrapper of ``module``, which it keeps as ``.inner``
Make = Callable[[nn.Module, TensorScheme, str, str], nn.Module]


@dataclass
class Wrapped:
    """One layer under training: its name inside the block, its key, the wrapper and its scheme."""

    name: str
    key: str
    layer: nn.Module
    scheme: TensorScheme


#: fit(wrapped) -> (one frozen QuantizedTensor per wrapped layer, in order; the method's report entries)
Fit = Callable[[list[Wrapped]], tuple[list[QuantizedTensor], dict[str, Any]]]


def solve_wrapped(block: nn.Module, data: BlockData, make: Make, method: str, fit: Fit) -> dict[str, Any]:
    """Wrap ``data.layers`` with ``make``, run ``fit`` on the wrapped layers, put the original
    modules back and attach the QuantizedTensors ``fit`` froze.

    Returns the block's report: the keys trained (``layers``) and rounded to nearest (if any),
    then ``fit``'s own entries; only the first two when no layer could be wrapped (``fit`` is not
    called). ``method`` names the method in error messages.
    """
    if data.fp_out is None:
        raise LowbitError(f"{method} needs the float block's outputs; run it through lowbit.engine.runner.calibrate")
    wrapped, rounded = wrap(block, data.layers, make, method)
    info: dict[str, Any] = {"layers": [w.key for w in wrapped]}
    if rounded:
        info["rounded_to_nearest"] = rounded
    if not wrapped:
        return info
    try:
        frozen, report = fit(wrapped)
    finally:
        for w in wrapped:
            put(block, w.name, w.layer.inner)
    for w, qt in zip(wrapped, frozen):
        attach_frozen(w.layer.inner, qt, w.scheme, w.layer.inner.weight.dtype)
    return {**info, **report}


def wrap(block: nn.Module, layers: list, make: Make, method: str) -> tuple[list[Wrapped], list[str]]:
    """Swap each targeted Linear / Conv1D of ``block`` for ``make(module, scheme, layout, key)``.

    ``layers``: ``BlockData.layers``, (key, module, param, scheme). Returns the wrapped layers and
    the keys of tensors rounded to nearest instead (fused experts, convolutions), which are
    attached at once. Every layer is checked, and every wrapper built, before the block changes.
    A scheme's input spec rounds the wrapper's input during training too (``input_rounding``).
    """
    names = {id(m): n for n, m in block.named_modules()}
    known = {(t.module_name, t.param): t for t in targets(block)}
    todo, rounded = [], []
    for key, module, param, scheme in layers:
        name = names.get(id(module))
        target = known.get((name, param))
        if target is None:
            raise LowbitError(f"{key} is not a quantizable tensor of the block being solved")
        if param in qtensors(module):
            raise LowbitError(f"{key} is already quantized by an earlier stage; {method} cannot change it")
        if target.kind != "linear" or not name:
            rounded.append(key)
            continue
        todo.append((name, key, module, target.layout, scheme))
    made = []
    for name, key, module, layout, scheme in todo:
        layer = make(module, scheme, layout, key)
        if scheme.input is not None:  # the wrapper is dropped after the solve, and its hook with it
            layer.register_forward_pre_hook(input_rounding(scheme.input))
        made.append(Wrapped(name, key, layer, scheme))
    for key, module, param, scheme in layers:
        if key in rounded:
            w = getattr(module, param)
            layout = known[(names[id(module)], param)].layout
            attach_frozen(module, quantize_weight(w, scheme.weight, layout, key), scheme, w.dtype, param)
    for w in made:
        put(block, w.name, w.layer)
    return made, rounded


@contextmanager
def training(block: nn.Module, trained: list[nn.Parameter]) -> Iterator[None]:
    """Gradients on, for the ``trained`` parameters of ``block`` only; undone after."""
    ids = {id(p) for p in trained}
    frozen = [p for p in block.parameters() if p.requires_grad and id(p) not in ids]
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def batch_order(n: int, steps: int, seed: int = 0) -> list[int]:
    """The batch index of each of ``steps`` training steps over ``n`` batches: a fresh permutation
    per pass, from a fixed seed, so the same inputs give the same bytes."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(n, generator=generator).tolist()
    return order[:steps]


def snapshot(params: list[Tensor]) -> list[Tensor]:
    """Detached copies of ``params``, for ``restore``."""
    return [p.detach().clone() for p in params]


def restore(params: list[Tensor], state: list[Tensor]) -> None:
    """Copy ``state`` (from ``snapshot``) back into ``params``, in place."""
    with torch.no_grad():
        for p, value in zip(params, state):
            p.copy_(value)


def keep_better(score: Callable[[], float], params: list[Tensor],
                train: Callable[[], None] | None) -> tuple[float, float, bool]:
    """Score, ``train`` (in place; None: no training), score again; ``params`` go back to their
    start unless the second score is strictly lower. Returns (before, after, learned), with
    ``after`` the score after training (``before`` without), whichever is kept."""
    before = score()
    if train is None:
        return before, before, False
    start = snapshot(params)
    train()
    after = score()
    if not after < before:
        restore(params, start)
    return before, after, after < before


def forward_with(inner: nn.Module, matrix: Tensor, layout: str, args: tuple, kwargs: dict) -> Any:
    """``inner``'s forward on ``args`` / ``kwargs`` with its weight replaced by ``matrix`` (the
    (rows, cols) matrix view in ``layout``, any float dtype; differentiable), reshaped to the
    weight's shape and cast to its dtype."""
    w = inner.weight
    return functional_call(inner, {"weight": from_matrix(matrix, tuple(w.shape), layout).to(w.dtype)}, args, kwargs)


def block_loss(block: nn.Module, data: BlockData) -> float:
    """Mean squared error of the block's outputs on ``q_in`` against ``fp_out``, over all batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for j, call in enumerate(data.calls):
            out = call.run(block, data.q_in[j]).float()  # (B, T, hidden)
            total += float(F.mse_loss(out, data.fp_out[j].float(), reduction="sum"))
            count += out.numel()
    return total / max(count, 1)


def input_rounding(spec: ActSpec):
    """A forward pre-hook rounding a layer's input as ``spec`` says; the rounding is passed
    straight through (value: the rounded input exactly; gradient: identity)."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        q = quantize_input(x.detach(), spec)
        return (q + (x - x.detach()), *args[1:])

    return hook


def attach_frozen(module: nn.Module, qt: Any, scheme: TensorScheme, dtype: torch.dtype, param: str = "weight") -> None:
    """Attach ``qt`` to ``module.<param>``, with the scheme's input-activation spec."""
    if scheme.input is not None:
        qt = replace(qt, input=scheme.input)
    attach(module, param, qt, dtype)


def put(block: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule ``name`` of ``block`` to ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, child, module)


def mse(out: Tensor, target: Tensor) -> Tensor:
    """The training loss of one batch: mean squared error in float32."""
    return F.mse_loss(out.float(), target.float())
