"""What a finished block leaves in the run's checkpoint, and how a resumed run puts it back.

A block's payload holds the quantized tensors attached in the block (every role, under
``<module>.<param>.<role>``, whichever stage or hook attached them), the keep-masks of float
pruned weights (``mask:<module>.<param>``), the float tensors of the block when a stage changed
float weights in place (pruned weights, folded norms), and the report lines of the block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.engine.checkpoint import RunDir, read_block
from lowbit.engine.report import RunReport
from lowbit.nn.reference import add_bias, attach, attach_mask, float_masks, qtensors
from lowbit.qtensor import ROLES, QuantizedTensor


def block_payload(block: nn.Module, prefix: str, counts: list[int], report: RunReport,
                  floats: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) to checkpoint for a finished block whose keys start with ``prefix``."""
    tensors, meta, mask_keys = {}, {}, []
    for sub_name, sub in block.named_modules(prefix=prefix.rstrip(".")):
        for param, qt in qtensors(sub).items():
            key = f"{sub_name}.{param}"  # as io.save names it
            for role, t in qt.to_tensors().items():
                tensors[f"{key}.{role}"] = t
            meta[key] = {**qt.meta(), "dtype": str(getattr(sub, param).dtype).removeprefix("torch.")}
        for param, mask in float_masks(sub).items():
            tensors[f"mask:{sub_name}.{param}"] = mask
            mask_keys.append(f"{sub_name}.{param}")
    float_keys = []
    if floats:
        for key, t in block.state_dict(prefix=prefix).items():
            tensors[f"float:{key}"] = t.detach().contiguous()
            float_keys.append(key)
    layers = [r for r in report.layers if r["key"].startswith(prefix)]
    fallbacks = [f for f in report.fallbacks if f.startswith(prefix)]
    stages = [{"done": n, "blocks": s.blocks[-1:] if s.blocks else []} for n, s in zip(counts, report.stages)]
    return tensors, {"tensors": meta, "floats": float_keys, "masks": mask_keys, "layers": layers,
                     "fallbacks": fallbacks, "stages": stages}


def restore_report(report: RunReport, run: RunDir, i: int) -> None:
    """Add a finished block's report lines (resume)."""
    _, meta = run.load_block(i)
    report.layers += meta["layers"]
    report.fallbacks += meta["fallbacks"]
    for sr, st in zip(report.stages, meta.get("stages", [])):
        sr.done += st["done"]
        sr.blocks += st["blocks"]


def restore_block(model: nn.Module, folder: Path, i: int) -> None:
    """Put block ``i``'s float changes and quantized tensors from the checkpoint ``folder`` into ``model``."""
    tensors, meta = read_block(folder, i)
    if meta.get("floats"):
        state = {k: tensors[f"float:{k}"] for k in meta["floats"]}
        with torch.no_grad():
            for key, t in state.items():
                _tensor_at(model, key).copy_(t)
    modules = dict(model.named_modules())
    for key in meta.get("masks", []):
        module_name, _, param = key.rpartition(".")
        attach_mask(modules[module_name], param, tensors[f"mask:{key}"])
    for key, m in meta["tensors"].items():
        module_name, _, param = key.rpartition(".")
        parts = {r: tensors[f"{key}.{r}"] for r in ROLES if f"{key}.{r}" in tensors}
        attach(modules[module_name], param, QuantizedTensor.from_tensors(m, parts), getattr(torch, m["dtype"]))


def _tensor_at(model: nn.Module, key: str) -> torch.Tensor:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name == "bias" and getattr(module, "bias", None) is None:
        return add_bias(module)  # one that bias correction added
    return getattr(module, name)
