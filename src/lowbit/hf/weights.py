"""Weights read block by block from memory-mapped safetensors, so a model larger than RAM fits.

The model is built on the meta device (``hf.lazy.open_streamed``); ``WeightSource`` knows which
file holds each tensor; ``fill(module, prefix)`` reads the module's tensors from the mapped
files into fresh parameters (every owner of a tied parameter gets the same one) and
``empty(module)`` sends them back to the meta device, dropping the block's quantized tensors
too: they are in the run's checkpoint by then.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
import torch
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.nn.reference import ADDED_BIAS, forget

INDEX = "model.safetensors.index.json"


class WeightSource:
    """Tensor key -> safetensors file of a Hugging Face folder (one file or an indexed set of shards)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            self.where = {k: self.folder / f for k, f in weight_map.items()}
        else:
            self.where = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), "pt") as fh:
                    self.where.update({k: f for k in fh.keys()})
        if not self.where:
            raise LowbitError(f"{self.folder} has no safetensors weights to stream")

    def get(self, key: str) -> Tensor:
        if key not in self.where:
            raise LowbitError(f"{self.folder} has no tensor {key}; is it the checkpoint of this model?")
        with safe_open(str(self.where[key]), "pt") as fh:
            return fh.get_tensor(key)

    def identity(self) -> list:
        """Names, sizes and modification times of the files, for a run's fingerprint."""
        files = sorted(set(self.where.values()))
        return [(f.name, os.stat(f).st_size, int(os.stat(f).st_mtime)) for f in files]

    def nbytes(self, prefix: str = "") -> int:
        """Bytes on disk of the tensors whose key starts with ``prefix``."""
        total = 0
        by_file: dict[Path, list[str]] = {}
        for k, f in self.where.items():
            if k.startswith(prefix):
                by_file.setdefault(f, []).append(k)
        for f, keys in by_file.items():
            with safe_open(str(f), "pt") as fh:
                for k in keys:
                    sl = fh.get_slice(k)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
        return total


def fill(model: nn.Module, module: nn.Module, prefix: str, source: WeightSource, skip: str | None = None) -> None:
    """Replace every meta parameter and persistent buffer under ``module`` by its tensor from disk.

    ``prefix`` is ``module``'s key prefix in the checkpoint; keys starting with ``skip`` are left
    on the meta device (the blocks, when filling everything else).
    """
    owners = _owners(model)
    for name, p in list(module.named_parameters()):
        if p.device.type != "meta" or (skip and (prefix + name).startswith(skip)):
            continue
        if _added_bias(module, name):  # not on disk: the run's checkpoint fills it (bias correction)
            fresh = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=False)
        else:
            fresh = nn.Parameter(source.get(prefix + name), requires_grad=False)
        for owner, pname in owners.get(id(p), []):
            owner._parameters[pname] = fresh
    for name, b in list(module.named_buffers()):
        if b.device.type != "meta" or (skip and (prefix + name).startswith(skip)):
            continue
        owner_name, _, bname = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if bname not in owner._non_persistent_buffers_set:
            owner._buffers[bname] = source.get(prefix + name)


def _added_bias(module: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` of ``module`` is a bias that bias correction added."""
    owner_name, _, pname = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return pname == "bias" and bool(owner.__dict__.get(ADDED_BIAS))


def empty(module: nn.Module) -> None:
    """Send a block's tensors back to the meta device and forget its quantized tensors."""
    for sub in module.modules():
        forget(sub)
    module.to("meta")


def missing_keys(model: nn.Module, source: WeightSource) -> list[str]:
    """State-dict keys of ``model`` that the source does not have (tied twins excluded)."""
    seen, missing = set(), []
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if key not in source.where:
            missing.append(key)
    return missing


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, pname))
    return owners


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}.get(dtype, 4)

