"""Save and load quantized models: safetensors + a JSON manifest, written atomically.

A saved folder holds

* ``model.safetensors``: every unquantized tensor under its state-dict key, and for each
  quantized weight ``<key>.codes`` (packed uint8), ``<key>.scale`` and, where the format has
  them, ``<key>.zero`` and ``<key>.global_scale``;
* ``lowbit.json``: lowbit version, format version, the spec, shape, layout and compute dtype
  of every quantized tensor, and the aliases of tied tensors;
* for Hugging Face models, ``config.json``, the generation config and the tokenizer.

Everything is written into a temporary sibling folder and renamed into place, so a failed
save leaves nothing half written. Same model, same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.apply import attach, quantized_tensors
from lowbit.errors import LowbitError
from lowbit.qtensor import QuantizedTensor

MANIFEST = "lowbit.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
_ROLES = ("codes", "scale", "zero", "global_scale")


def save(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write ``model`` (quantized or not) to the folder ``out``; returns its path."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output folder {out} already exists; choose another path or pass overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise LowbitError(f"cannot write into {out.parent} ({e.strerror}); choose an output folder you can write") from None
    try:
        tensors, manifest = _collect(model)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: safetensors orders keys at random
        _write_json(tmp / MANIFEST, manifest)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            (tmp / "config.json").write_text(config.to_json_string(use_diff=True))
            gen = getattr(model, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _finish(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in sorted(model.state_dict().items()):
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    qmeta: dict[str, dict] = {}
    first: dict[int, str] = {}  # id(qtensor) -> the key that stores it (tied weights share one)
    for module_name, param, qt, dtype in sorted(quantized_tensors(model), key=lambda r: (r[0], r[1])):
        key = f"{module_name}.{param}" if module_name else param
        if id(qt) in first:
            qmeta[key] = {"same_as": first[id(qt)]}
            continue
        first[id(qt)] = key
        for role, t in qt.to_tensors().items():
            tensors[f"{key}.{role}"] = t.contiguous()
        qmeta[key] = {**qt.meta(), "dtype": str(dtype).removeprefix("torch.")}
    config = getattr(model, "config", None)
    kind = "hf" if config is not None and hasattr(config, "to_json_string") else "module"
    manifest = {
        "lowbit_version": lowbit.__version__,
        "format_version": FORMAT_VERSION,
        "model": {"kind": kind, "class": type(model).__name__, "dtype": _dtype_name(model)},
        "quantized": qmeta,
        "aliases": aliases,
    }
    return tensors, manifest


def _dtype_name(model: nn.Module) -> str:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return str(floats[0] if floats else torch.float32).removeprefix("torch.")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _finish(tmp: Path) -> None:
    """Flush every file to disk and give the folder the usual permissions (mkdtemp makes 0700)."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after.

    If the final rename fails, the old folder is put back, so ``out`` is never lost.
    """
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise LowbitError(f"{path} is not a lowbit folder (no {MANIFEST}); save one with `lowbit quantize`")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path / MANIFEST} is not valid JSON ({e}); quantize the model again") from None
    missing = [k for k in ("lowbit_version", "model", "quantized", "aliases") if k not in manifest]
    if not isinstance(manifest, dict) or missing:
        raise LowbitError(f"{path / MANIFEST} is damaged (missing {missing}); quantize the model again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LowbitError(
            f"{path} has lowbit format version {manifest.get('format_version')}; "
            f"this lowbit {lowbit.__version__} reads version {FORMAT_VERSION}"
        )
    return manifest


def load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Fill the skeleton ``model`` (same architecture) from a saved folder; returns it."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors = load_file(str(path / WEIGHTS))
    modules = dict(model.named_modules())
    built: dict[str, tuple[QuantizedTensor, torch.Tensor]] = {}
    quantized = manifest["quantized"]
    for key in sorted(quantized, key=lambda k: "same_as" in quantized[k]):  # sources before their twins
        meta = quantized[key]
        module_name, _, param = key.rpartition(".")
        if module_name not in modules:
            raise LowbitError(f"{path} quantizes {key}, which the model does not have; is it the same architecture?")
        if "same_as" in meta:
            qt, weight = built[meta["same_as"]]
            attach(modules[module_name], param, qt, weight.dtype, weight)
            continue
        parts = {r: tensors.pop(f"{key}.{r}") for r in _ROLES if f"{key}.{r}" in tensors}
        qt = QuantizedTensor.from_tensors(meta, parts)
        built[key] = (qt, attach(modules[module_name], param, qt, getattr(torch, meta["dtype"])))
    for alias, source in manifest["aliases"].items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LowbitError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model
