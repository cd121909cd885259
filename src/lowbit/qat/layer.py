"""``FakeQuantLinear``: a trainable float weight computed through its ``QuantSpec``; ``freeze()``
gives the ``QuantizedTensor`` post-training quantization writes.

``prepare(model, plan)`` swaps the targeted layers (``nn.Linear`` and GPT-2's ``Conv1D``) for
fake-quant layers, ``freeze_model(model)`` puts the original modules back with their frozen
``QuantizedTensor`` attached (``lowbit.nn.reference.attach``), so ``lowbit.save``, ``lowbit.load`` and
the exports see an ordinary quantized model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call

from lowbit.nn.reference import attach
from lowbit.errors import LowbitError
from lowbit.models.targets import Target, resolve_targets
from lowbit.qat.fakequant import check_learnable, fake_quantize, initial_qparams, quantize_with
from lowbit.qtensor import QuantizedTensor, from_matrix, matrix_view
from lowbit.quantizer import check_weight, pack_matrix, quantize_weight
from lowbit.scheme import Rule, resolve
from lowbit.spec import QuantSpec

Plan = Union[Sequence[Rule], Sequence[tuple[Target, QuantSpec]]]


class FakeQuantLinear(nn.Module):
    """Wraps ``inner`` (an ``nn.Linear`` (out, in) or a GPT-2 ``Conv1D`` (in, out)) and runs its own
    forward with the fake-quantized weight, so the outputs equal the frozen module's bit for bit.

    weight:  ``inner.weight``, the trainable float Parameter (any float dtype).
    scale:   with ``learn_scale``, the float32 scale grid (grid_rows, grid_cols) Parameter,
             initialised from the spec's own scale choice; ``zero`` (same shape) and
             ``global_scale`` (()) are fixed buffers beside it. Without it, the scale is the
             spec's choice on the current weight at every forward.
    enabled: False computes with the float weight (the float model, e.g. for a KL target).
    """

    def __init__(self, inner: nn.Module, spec: QuantSpec, learn_scale: bool = False, layout: str = "rows",
                 name: str = "weight") -> None:
        super().__init__()
        w = inner.weight
        m = matrix_view(w.detach().to(torch.float32), layout)  # (rows, cols)
        check_weight(m, spec, *m.shape, name)
        if learn_scale:
            check_learnable(spec, name)
        self.inner, self.spec, self.layout, self.name, self.enabled = inner, spec, layout, name, True
        scale, zero, gscale = initial_qparams(m, spec) if learn_scale else (None, None, None)
        self.register_parameter("scale", None if scale is None else nn.Parameter(scale))
        self.register_buffer("zero", zero)
        self.register_buffer("global_scale", gscale)

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    @property
    def learn_scale(self) -> bool:
        return self.scale is not None

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight, in the weight's shape and dtype; differentiable."""
        w = self.weight
        m = matrix_view(w.to(torch.float32), self.layout)  # (rows, cols)
        q = fake_quantize(m, self.spec, self.scale, self.zero, self.global_scale)
        return from_matrix(q, tuple(w.shape), self.layout).to(w.dtype)

    def forward(self, *args, **kwargs):
        if not self.enabled:
            return self.inner(*args, **kwargs)
        return functional_call(self.inner, {"weight": self.fake_weight()}, args, kwargs)

    @torch.no_grad()
    def freeze(self) -> QuantizedTensor:
        """The ``QuantizedTensor`` of the current weight (and learned scale): same spec, layout and
        packing as ``lowbit.quantizer.quantize_weight``, which it is without a learned scale."""
        w = self.weight.detach()
        if self.scale is None:
            return quantize_weight(w, self.spec, self.layout, self.name)
        m = matrix_view(w.to(torch.float32), self.layout)
        codes, stored = quantize_with(m, self.spec, self.scale, self.zero, self.global_scale)
        zero = None if self.zero is None else self.zero.clone()
        gscale = None if self.global_scale is None else self.global_scale.clone()
        return pack_matrix(self.spec, tuple(w.shape), self.layout, codes, stored, zero, gscale)

    def extra_repr(self) -> str:
        return f"spec={self.spec.format.name}:{self.spec.granularity}, learn_scale={self.learn_scale}"


def prepare(model: nn.Module, plan: Plan, learn_scale: bool = False) -> list[FakeQuantLinear]:
    """Swap every Linear / Conv1D that ``plan`` targets for a ``FakeQuantLinear``, in place.

    ``plan``: rules (``lowbit.models.targets.default_plan``, resolved by ``resolve_targets``) or
    (target, spec) pairs. Every target is checked before any module changes. Returns the layers.
    """
    pairs = list(plan)
    if pairs and isinstance(pairs[0], Rule):
        done = [name for name, _ in fake_quant_layers(model) if resolve(pairs, name) is not None]
        if done:
            raise LowbitError(f"{done[0]} is already fake-quantized; prepare the float model instead")
        pairs = resolve_targets(model, pairs)
    if not pairs:
        raise LowbitError("the plan targets no tensor of this model; check its patterns against the module names")
    shared = _shared_weights(model)
    made = []
    for target, spec in pairs:
        module = model.get_submodule(target.module_name)
        if target.kind != "linear" or target.param != "weight":
            raise LowbitError(f"{target.key} is a {target.kind} tensor; fake quantization covers Linear and Conv1D "
                              "weights only, so leave it out of the plan")
        if target.quantized or isinstance(module, FakeQuantLinear):
            raise LowbitError(f"{target.key} is already quantized; prepare the float model instead")
        if shared.get(id(module.weight), 1) > 1:
            raise LowbitError(f"{target.key}'s weight is tied to another module; untie it or leave it out of the plan")
        made.append((target, FakeQuantLinear(module, spec, learn_scale, target.layout, target.key)))
    for target, layer in made:
        _replace(model, target.module_name, layer)
    return [layer for _, layer in made]


def fake_quant_layers(model: nn.Module) -> Iterator[tuple[str, FakeQuantLinear]]:
    """(name, layer) of every ``FakeQuantLinear`` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantLinear):
            yield name, module


def freeze_model(model: nn.Module) -> dict[str, QuantizedTensor]:
    """Put every fake-quant layer's original module back, holding its frozen ``QuantizedTensor``
    (attached as post-training quantization does); returns them by module name."""
    frozen = {}
    for name, layer in list(fake_quant_layers(model)):
        qt = layer.freeze()
        attach(layer.inner, "weight", qt, layer.weight.dtype)
        _replace(model, name, layer.inner)
        frozen[name] = qt
    return frozen


@contextmanager
def float_weights(model: nn.Module) -> Iterator[None]:
    """Inside, every fake-quant layer computes with its float weight (the float model)."""
    layers = [layer for _, layer in fake_quant_layers(model)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _shared_weights(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many modules hold it."""
    count: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            count[id(p)] = count.get(id(p), 0) + 1
    return count
