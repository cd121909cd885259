"""Save and load quantized models: safetensors + a JSON manifest, written atomically.

A saved folder holds

* ``model.safetensors``: every unquantized tensor under its state-dict key, for each quantized
  weight one tensor per stored role, ``<key>.<role>`` (``codes``, ``scale``, and where present
  ``zero``, ``global_scale``, ``mask``, ``lowrank_a``, ``lowrank_b``, ``input_scale``; see
  ``lowbit.qtensor``), and for each float weight pruned in place its bit-packed ``<key>_mask``;
* ``lowbit.json``: the manifest (``lowbit.manifest`` has its layout and versions);
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
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.manifest import (FORMAT_VERSION, MANIFEST, RECIPE_ATTR, check_agree, migrate, quantization_config,
                             restore_recipe)
from lowbit.nn.convert import place
from lowbit.nn.reference import add_bias, added_biases, attach, attach_mask, masks, quantized_tensors
from lowbit.qtensor import QuantizedTensor, pack_mask, unpack_mask
from lowbit.version import __version__


WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def save(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False,
         chunks: Iterable[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write ``model`` (quantized or not) to the folder ``out``; returns its path.

    ``chunks`` (from ``collect`` on parts of the model, produced one at a time) writes one
    safetensors shard per chunk plus ``model.safetensors.index.json``, so a model whose blocks
    are streamed from disk is saved without ever being whole in memory.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output folder {out} already exists; choose another path or pass overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise LowbitError(f"cannot write into {out.parent} ({e.strerror}); choose an output folder you can write") from None
    try:
        manifest = _write_weights(tmp, [collect(model)] if chunks is None else chunks)
        manifest["model"] = _model_info(model)
        if added_biases(model):  # transformers' from_pretrained would drop them: lowbit.load adds them
            manifest["added_biases"] = added_biases(model)
        if model.__dict__.get(RECIPE_ATTR):
            manifest["made_by"] = model.__dict__[RECIPE_ATTR]  # the runs' recipes and rules, when lowbit made it
        _write_json(tmp / MANIFEST, manifest)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            _write_config(tmp / "config.json", config, manifest)
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


def _write_weights(tmp: Path, chunks: Iterable[tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> dict[str, Any]:
    """One file for a single chunk, numbered shards and an index for several; returns the manifest."""
    manifest: dict[str, Any] = {"lowbit_version": __version__, "format_version": FORMAT_VERSION,
                                "quantized": {}, "masks": {}, "aliases": {}}
    names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    for i, (tensors, part) in enumerate(chunks):
        name = f"shard-{i:05d}.safetensors"
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})  # one key: safetensors orders keys at random
        names.append(name)
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        for k in ("quantized", "masks", "aliases"):
            manifest[k].update(part[k])
    if len(names) == 1:
        os.replace(tmp / names[0], tmp / WEIGHTS)
        return manifest
    for i, name in enumerate(names):
        final = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        os.replace(tmp / name, tmp / final)
        weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(tmp / INDEX, index)
    return manifest


def collect(module: nn.Module, prefix: str = "", skip: str | None = None
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors to save and the manifest part (``quantized``, ``masks``, ``aliases``) of ``module``.

    Keys get ``prefix``; keys starting with ``skip`` (a streamed model's blocks) are left out.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in sorted(module.state_dict(prefix=prefix).items()):
        if skip is not None and key.startswith(skip):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    qmeta: dict[str, dict] = {}
    first: dict[int, str] = {}  # id(qtensor) -> the key that stores it (tied weights share one)
    for module_name, param, qt, dtype in sorted(quantized_tensors(module), key=lambda r: (r[0], r[1])):
        key = prefix + (f"{module_name}.{param}" if module_name else param)
        if skip is not None and key.startswith(skip):
            continue
        if id(qt) in first:
            qmeta[key] = {"same_as": first[id(qt)]}
            continue
        first[id(qt)] = key
        for role, t in qt.to_tensors().items():
            tensors[f"{key}.{role}"] = t.contiguous()
        qmeta[key] = {**qt.meta(), "dtype": str(dtype).removeprefix("torch.")}
    mmeta: dict[str, dict] = {}
    for module_name, param, mask in sorted(masks(module), key=lambda r: (r[0], r[1])):
        key = prefix + (f"{module_name}.{param}" if module_name else param)
        if skip is None or not key.startswith(skip):
            if f"{key}_mask" in tensors:
                raise LowbitError(f"{key} is pruned, but the model already has a tensor {key}_mask, where lowbit "
                                  "stores its mask; rename that tensor")
            tensors[f"{key}_mask"] = pack_mask(mask)  # a name transformers' loader can fill (see hf.quantizer)
            mmeta[key] = {"shape": list(mask.shape), "tensor": f"{key}_mask"}
    return tensors, {"quantized": qmeta, "masks": mmeta, "aliases": aliases}


def _write_config(path: Path, config: Any, manifest: dict[str, Any]) -> None:
    """config.json, with a ``quantization_config`` that lets transformers' ``from_pretrained``
    load the folder (``lowbit.hf.quantizer``); an unquantized model gets none."""
    d = json.loads(config.to_json_string(use_diff=True))
    d.pop("quantization_config", None)
    if manifest["quantized"] or manifest["masks"]:
        d["quantization_config"] = quantization_config(manifest)
    _write_json(path, d)


def _model_info(model: nn.Module) -> dict[str, str]:
    config = getattr(model, "config", None)
    kind = "hf" if config is not None and hasattr(config, "to_json_string") else "module"
    return {"kind": kind, "class": type(model).__name__, "dtype": _dtype_name(model)}


def _dtype_name(model: nn.Module) -> str:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point() and p.device.type != "meta"]
    return str(floats[0] if floats else torch.float32).removeprefix("torch.")


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _finish(tmp: Path) -> None:
    """Flush every file to disk and give the folder the usual permissions (mkdtemp makes 0700)."""
    for f in tmp.rglob("*"):  # tokenizers may write subfolders (additional_chat_templates/)
        if f.is_file():
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
    """The folder's manifest at the current format version (``lowbit.manifest.migrate``).

    Refuses a damaged manifest, a newer folder format, and a folder whose config.json carries a
    ``quantization_config`` that disagrees with lowbit.json.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise LowbitError(f"{path} is not a lowbit folder (no {MANIFEST}); save one with `lowbit quantize`")
    manifest = _read_json(path / MANIFEST)
    missing = [k for k in ("lowbit_version", "model", "quantized", "aliases") if k not in manifest]
    if not isinstance(manifest, dict) or missing:
        raise LowbitError(f"{path / MANIFEST} is damaged (missing {missing}); quantize the model again")
    manifest = migrate(manifest, str(path))
    if (path / "config.json").is_file():
        qc = _read_json(path / "config.json").get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "lowbit":
            check_agree(manifest, qc, str(path))
    return manifest


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path} is not valid JSON ({e}); quantize the model again") from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder: ``model.safetensors``, or the shards its index lists."""
    if (path / WEIGHTS).is_file():
        return load_file(str(path / WEIGHTS))
    if not (path / INDEX).is_file():
        raise LowbitError(f"{path} has neither {WEIGHTS} nor {INDEX}; quantize the model again")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values())):
        tensors.update(load_file(str(path / shard)))
    return tensors


def load_into(model: nn.Module, path: str | os.PathLike, packed: bool = True) -> nn.Module:
    """Fill the skeleton ``model`` (same architecture) from a saved folder; returns it.

    ``packed=True`` builds a packed ``lowbit.nn.QuantLinear`` for every quantized Linear (and
    GPT-2 Conv1D) whose weight no other module shares; the weight is never dequantized. Other
    quantized tensors, and every one with ``packed=False``, take the reference path
    (``lowbit.nn.reference.attach``: the module computes with the dequantized weight). Float
    weights pruned in place get their masks back (``lowbit.nn.reference.attach_mask``).

    Sparse weights come back with their zeros in place either way: a quantized weight's ``mask``
    role stays in its QuantizedTensor, which both paths dequantize with the mask applied (the
    packed int8/int4 kernels only take a mask whose pruned codes are already the zero code,
    ``lowbit.nn.quant_linear.mask_is_free``; any other masked weight takes the dequant kernel).
    """
    path = Path(path)
    manifest = read_manifest(path)
    tensors = read_weights(path)
    modules = dict(model.named_modules())
    restore_recipe(model, manifest)
    _add_saved_biases(model, modules, tensors)
    built: dict[str, tuple[QuantizedTensor, torch.Tensor]] = {}
    quantized = manifest["quantized"]
    shared = {meta["same_as"] for meta in quantized.values() if "same_as" in meta}
    for key in sorted(quantized, key=lambda k: "same_as" in quantized[k]):  # sources before their twins
        meta = quantized[key]
        module_name, _, param = key.rpartition(".")
        if module_name not in modules:
            raise LowbitError(f"{path} quantizes {key}, which the model does not have; is it the same architecture?")
        if "same_as" in meta:
            qt, weight = built[meta["same_as"]]
            attach(modules[module_name], param, qt, weight.dtype, weight)
            continue
        qt = QuantizedTensor.from_tensors(meta, pop_roles(tensors, key), name=key)
        dtype = getattr(torch, meta["dtype"])
        if key in shared:  # its twins, later in this loop, attach the same dequantized tensor
            built[key] = (qt, attach(modules[module_name], param, qt, dtype))
        else:
            place(model, module_name, param, qt, dtype, packed)
    float_masks = {key: unpack_mask(_pop(tensors, m["tensor"], path), tuple(m["shape"]))
                   for key, m in manifest["masks"].items()}
    for alias, source in manifest["aliases"].items():
        tensors[alias] = tensors[source]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LowbitError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for key, mask in float_masks.items():
        module_name, _, param = key.rpartition(".")
        attach_mask(model.get_submodule(module_name), param, mask)
    return model


def _add_saved_biases(model: nn.Module, modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """A Linear the saved folder gives a bias its skeleton lacks (added by bias correction) gets one."""
    known = set(model.state_dict())
    for key, t in tensors.items():
        module_name, _, name = key.rpartition(".")
        if name == "bias" and key not in known and getattr(modules.get(module_name), "bias", 1) is None:
            add_bias(modules[module_name], t.dtype)


def _pop(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in tensors:
        raise LowbitError(f"{path} lists the mask {key} but has no such tensor; it is damaged, quantize again")
    return tensors.pop(key)


def pop_roles(tensors: dict[str, torch.Tensor], key: str, need: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Remove and return every ``<key>.<role>`` tensor, keyed by role; ``need`` roles must be there."""
    found = {k[len(key) + 1:]: k for k in tensors if k.startswith(key + ".")}
    lost = [r for r in need if r not in found]
    if lost:
        raise LowbitError(f"the folder lists {key} but has no {key}.{lost[0]} tensor; it is damaged, quantize again")
    return {role: tensors.pop(k) for role, k in found.items()}
