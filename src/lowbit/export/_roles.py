"""Refuse, before writing anything, what an export target cannot store.

lowbit's own folder stores every role of a QuantizedTensor (``lowbit.qtensor``), input
activation specs and float sparsity masks. The exports store codes, scales, zeros and global
scales; masks only where the target passes ``allow=("mask",)`` (every target does: it writes
pruned weights as stored zeros, ``lowbit.export._sparse``), and biases that bias correction
added (``manifest["added_biases"]``) only where it passes ``"added_bias"`` (ONNX, whose graph is
the model itself). Each other part is refused with a one-line ``LowbitError`` naming it.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

from lowbit.errors import LowbitError
from lowbit.nn.reference import masks, quantized_tensors

WHAT = {"mask": "sparsity mask", "lowrank_a": "low-rank factors", "lowrank_b": "low-rank factors",
        "input_scale": "static input scale", "input": "input activation spec"}


def _refuse(target: str, role: str, key: str) -> LowbitError:
    return LowbitError(f"{target} cannot store the {WHAT[role]} ({role}) of {key}; export a model without it, "
                       "or keep the lowbit folder (lowbit.load, from_pretrained and lowbit eval read it)")


def refuse_extras(manifest: dict[str, Any], target: str, allow: Iterable[str] = ()) -> None:
    """Raise for the first quantized tensor (or float mask) of ``manifest`` that ``target`` cannot
    store; ``allow`` lists the roles (``"mask"``) the target handles itself."""
    allow = frozenset(allow)
    for key, meta in sorted(manifest["quantized"].items()):
        _check(target, key, meta.get("roles", ()), meta.get("input") is not None, allow)
    for key in sorted(manifest.get("masks", {})):
        if "mask" not in allow:
            raise _refuse(target, "mask", key)
    added = manifest.get("added_biases", [])
    if added and "added_bias" not in allow:
        raise LowbitError(f"{target} cannot store the biases bias correction added to {len(added)} layers that have "
                          f"none in this architecture (e.g. {added[0]}); its loaders would refuse or drop them. "
                          "Quantize without bias-correction to export, export to onnx, or keep the lowbit folder")


def refuse_model_extras(model: nn.Module, target: str, allow: Iterable[str] = ()) -> None:
    """The same for a model in memory."""
    allow = frozenset(allow)
    for name, param, qt, _ in sorted(quantized_tensors(model), key=lambda r: (r[0], r[1])):
        key = f"{name}.{param}" if name else param
        _check(target, key, [r for r in qt.to_tensors() if r in WHAT], qt.input is not None, allow)
    for name, param, _ in sorted(masks(model), key=lambda r: (r[0], r[1])):
        if "mask" not in allow:
            raise _refuse(target, "mask", f"{name}.{param}" if name else param)


def _check(target: str, key: str, roles: Iterable[str], has_input: bool, allow: frozenset[str]) -> None:
    for role in sorted(set(roles) - allow):
        raise _refuse(target, role, key)
    if has_input:
        raise _refuse(target, "input", key)
