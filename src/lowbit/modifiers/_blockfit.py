"""The plumbing every trained block solve shares (LSQ, SignRound): wrap the block's layers, train
with gradients on the chosen parameters only, score the block, put the layers back.

A trained block solve swaps each targeted Linear / GPT-2 Conv1D of a block for a trainable
wrapper (``wrap``, with a ``make`` callable that builds the wrapper), trains the wrappers'
parameters on the block-output error against the float block (``training``, ``block_loss``,
``batch_order``), then freezes each wrapper to its ``QuantizedTensor`` and puts the original
module back (``put``) with it attached (``attach_frozen``). Tensors that cannot be wrapped (fused
experts, convolutions) are rounded to nearest by ``wrap`` and listed for the report.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.models.targets import targets
from lowbit.modifiers.base import BlockData
from lowbit.nn.activation import quantize_input
from lowbit.nn.reference import attach, qtensors
from lowbit.quantizer import quantize_weight
from lowbit.scheme import ActSpec, TensorScheme

#: make(module, scheme, layout, key) -> the trainable wrapper of ``module``
Make = Callable[[nn.Module, TensorScheme, str, str], nn.Module]


@dataclass
class Wrapped:
    """One layer under training: its name inside the block, its key, the wrapper and its scheme."""

    name: str
    key: str
    layer: nn.Module
    scheme: TensorScheme


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
