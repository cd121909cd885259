"""The reference (fake-quant) path: quantized weights and sparsity masks held by ordinary modules.

``attach`` replaces a module's parameter by the ``QuantizedTensor`` that holds its codes plus a
non-persistent buffer of the same name with the dequantized weight, so the module's own forward
runs unchanged (Linear, GPT-2's Conv1D, Conv, Embedding, fused MoE experts alike). When the
QuantizedTensor carries an input ``ActSpec``, a forward pre-hook quantizes the module's input
too (``lowbit.nn.activation``).

A pruned weight that stays in float keeps its zeros in place and its keep-mask beside it:
``attach_mask`` records the mask, ``masks`` lists them. ``attach`` moves a mask recorded earlier
into the QuantizedTensor (its ``mask`` role), so prune-then-quantize keeps it.

Where things live on a module (read them through these functions, never by attribute name):

=====================  ==============================================
``qtensors(module)``   param name -> QuantizedTensor
``float_masks(module)`` param name -> (shape) bool keep-mask
``pop_float(module,    the float weight a quantized ``param`` was made
param)``               from, kept (``keep_float``) only while a later
                       stage that refines it has yet to run
=====================  ==============================================
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.nn.activation import quantize_input
from lowbit.memory import release_dead, release_when_dead
from lowbit.nn.quant_linear import QuantLinear
from lowbit.qtensor import QuantizedTensor

_QTENSORS = "_lowbit_qtensors"
_MASKS = "_lowbit_masks"
_HOOKED = "_lowbit_input_hook"
ADDED_BIAS = "_lowbit_added_bias"
_FLOATS = "_lowbit_float_weights"


def qtensors(module: nn.Module) -> dict[str, QuantizedTensor]:
    """param name -> QuantizedTensor attached to ``module`` (empty when none; do not mutate)."""
    return module.__dict__.get(_QTENSORS, {})


def float_masks(module: nn.Module) -> dict[str, Tensor]:
    """param name -> keep-mask of a float (unquantized) pruned weight of ``module``."""
    return module.__dict__.get(_MASKS, {})


def forget(module: nn.Module) -> None:
    """Drop the quantized tensors and masks recorded on ``module`` itself (not its children)."""
    module.__dict__.pop(_QTENSORS, None)
    module.__dict__.pop(_MASKS, None)
    module.__dict__.pop(_FLOATS, None)


def keep_float(module: nn.Module, param: str, W: Tensor) -> None:
    """Keep ``W``, the float32 matrix view (rows, cols) that ``module.<param>`` was quantized from,
    for a later stage that needs it (LoRC, bias correction): ``kept_float`` reads it,
    ``pop_float`` hands it over and forgets it."""
    module.__dict__.setdefault(_FLOATS, {})[param] = W


def kept_float(module: nn.Module, param: str) -> Tensor | None:
    """The float matrix view kept by ``keep_float``, or None if none was kept."""
    return module.__dict__.get(_FLOATS, {}).get(param)


def pop_float(module: nn.Module, param: str) -> Tensor | None:
    """The float matrix view kept by ``keep_float`` (and forget it), or None if none was kept."""
    return module.__dict__.get(_FLOATS, {}).pop(param, None)


def drop_floats(model: nn.Module) -> None:
    """Forget every float matrix view kept in ``model`` (its modules and itself)."""
    for module in model.modules():
        module.__dict__.pop(_FLOATS, None)


def attach(module: nn.Module, param: str, qt: QuantizedTensor, dtype: torch.dtype,
           weight: Tensor | None = None) -> Tensor:
    """Swap ``module.<param>`` for ``qt``; the module then computes with ``qt.dequantize(dtype)``.

    Pass ``weight`` (that dequantized tensor) to share it between tied modules. Returns it.
    A float mask recorded on ``param`` moves into ``qt.mask``.
    """
    mask = module.__dict__.get(_MASKS, {}).pop(param, None)
    if mask is not None and qt.mask is None:
        qt = replace(qt, mask=mask)
        weight = None
    if qt.input is not None:
        _check_input_owner(module, param, qt)
    release_dead()  # the weights earlier calls replaced
    if param in module._parameters:
        release_when_dead(module._parameters.pop(param))  # a checkpoint's mapped pages go with it
    weight = qt.dequantize(dtype) if weight is None else weight
    module.register_buffer(param, weight, persistent=False)
    module.__dict__.setdefault(_QTENSORS, {})[param] = qt
    if qt.input is not None and not module.__dict__.get(_HOOKED, False):
        module.register_forward_pre_hook(_input_hook)
        module.__dict__[_HOOKED] = True
    return weight


def _check_input_owner(module: nn.Module, param: str, qt: QuantizedTensor) -> None:
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    if param != "weight" or not linear:
        raise LowbitError(f"input quantization ({qt.input.format.name}:{qt.input.granularity}) applies to the "
                          f"input of a Linear layer, not to {param} of a {type(module).__name__}")


def _input_hook(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: quantize the first positional input as the weight's ``input`` spec says."""
    qt = qtensors(module).get("weight")
    if qt is None or qt.input is None or not args:
        return None
    return (quantize_input(args[0], qt.input, qt.input_scale), *args[1:])


def add_bias(module: nn.Module, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
    """The bias of a Linear (or GPT-2 Conv1D) ``module``; a zero (out,) bias Parameter is created
    for one without (bias correction, and loading or resuming what it saved).

    dtype / device: of the new bias (default: the float weight's, float32 for a quantized one).
    """
    if getattr(module, "bias", None) is not None:
        return module.bias
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    if not linear:
        raise LowbitError(f"cannot give a {type(module).__name__} a bias; only Linear and Conv1D layers take one")
    w = module.weight
    out = w.shape[0] if isinstance(module, nn.Linear) else w.shape[1]
    dtype = dtype or (w.dtype if w.is_floating_point() else torch.float32)
    module.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=device or w.device))
    module.__dict__[ADDED_BIAS] = True  # the saved manifest lists it (a loader's skeleton lacks it)
    return module.bias


def drop_added_bias(module: nn.Module) -> None:
    """Undo ``add_bias`` on ``module`` (nothing if its bias was its own)."""
    if module.__dict__.pop(ADDED_BIAS, False):
        module.bias = None


def added_biases(model: nn.Module) -> list[str]:
    """Names of the biases ``add_bias`` created in ``model`` (``<module>.bias``)."""
    return [f"{name}.bias" for name, m in model.named_modules() if m.__dict__.get(ADDED_BIAS)]


def attach_mask(module: nn.Module, param: str, mask: Tensor) -> None:
    """Record the keep-mask of ``module.<param>``, a float weight pruned in place.

    mask: bool, the weight's shape; True keeps a weight. The weight must already hold zeros
    wherever the mask is False (prune first, then record): refused otherwise.
    """
    w = getattr(module, param, None)
    if not isinstance(w, Tensor):
        raise LowbitError(f"{type(module).__name__} has no tensor {param!r} to attach a mask to")
    if param in qtensors(module):
        raise LowbitError(f"{param} of this {type(module).__name__} is quantized; set the QuantizedTensor's mask")
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(w.shape):
        raise LowbitError(f"a mask must be bool of the weight's shape {tuple(w.shape)}, "
                          f"not {mask.dtype} {tuple(mask.shape)}")
    if bool(w.detach()[~mask.to(w.device)].ne(0).any()):
        raise LowbitError(f"{param} holds nonzero values where the mask is False; zero them before attaching the mask")
    module.__dict__.setdefault(_MASKS, {})[param] = mask.detach().cpu()


def masks(model: nn.Module) -> Iterator[tuple[str, str, Tensor]]:
    """(module name, param, mask) for every float pruned weight (quantized ones carry ``qt.mask``)."""
    for name, module in model.named_modules():
        for param, mask in float_masks(module).items():
            yield name, param, mask


def quantized_tensors(model: nn.Module) -> Iterator[tuple[str, str, QuantizedTensor, torch.dtype]]:
    """(module name, param, qtensor, compute dtype) for every quantized weight.

    Packed ``QuantLinear`` layers rebuild their QuantizedTensor code for code.
    """
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, "weight", module.qtensor(), module.dtype
            continue
        for param, qt in qtensors(module).items():
            yield name, param, qt, getattr(module, param).dtype
