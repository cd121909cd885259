"""Export to compressed-tensors, the checkpoint format of vLLM and llm-compressor.

The output folder is a Hugging Face model folder whose ``config.json`` carries a
``quantization_config`` (``quant_method: compressed-tensors``) with one config group per
distinct weight scheme; its targets are the exact module names, and every ``nn.Linear`` left
unquantized is listed in ``ignore`` (vLLM refuses a Linear that no target or ignore names).

==============================  ================  =============================================
lowbit format                   format            tensors of module ``m``
==============================  ================  =============================================
int4, int8 (symmetric)          pack-quantized    ``m.weight_packed`` int32 (out, ceil(in·b/32)),
uint4, uint8 (integer zero)                       ``m.weight_scale`` float32 (out, n_groups),
                                                  ``m.weight_shape`` int64 [out, in] and, with a
                                                  zero, ``m.weight_zero_point`` int32
                                                  (ceil(out·b/32), n_groups)
fp8_e4m3fn                      float-quantized   ``m.weight`` float8_e4m3fn (out, in),
                                                  ``m.weight_scale`` float32
==============================  ================  =============================================

Granularity: int weights use the ``channel`` or ``group`` strategy (the ones vLLM's WNA16
kernels take); per-tensor and ``bRxC`` scales are repeated down the rows, which is exact. A
group must divide the input dim: compressed-tensors' group strategy has no partial last group.
fp8 keeps ``tensor``, ``channel``, ``group`` and ``block`` (edge blocks may be partial: the reader
pads, as for llm-compressor's FP8_BLOCK).

Codes are copied, never requantized. compressed-tensors stores a signed value ``q`` as the
unsigned ``q + 2^(b-1)``, 32/b per little-endian int32 word along the input dim (zero points
along the output dim); lowbit's int codes are that offset code already (symmetric: ``q +
2^(b-1)``; integer zero: code ``c``, zero ``z`` mean ``q = c - 2^(b-1)``, ``zp = z - 2^(b-1)``).
lowbit's fp8_e4m3fn codes are the bits of ``torch.float8_e4m3fn``. Only 4 and 8 bits are
exported: vLLM's WNA16 kernels take no other width (and at these widths older
compressed-tensors releases pack the same way).

Sparse models are densified with a warning by default (``lowbit.export._sparse``): pruned weights
become stored zeros (the int and fp8 formats here always have an exact zero code). ``sparsity_config``
stays ``{}``: current vLLM raises for one that names targets, even of format ``dense``. A float
pruned model becomes a plain dense folder. ``sparse_format="sparse-bitmask"`` or
``"sparse-24-bitmask"`` writes a float pruned model in compressed-tensors' sparse formats instead
(``lowbit.export._ct_sparse``; readable by compressed-tensors up to 0.14 only).

Exactness: compressed-tensors dequantizes in the dtype of the stored scale,
``(q - zp).to(scale.dtype) * scale``; with float16 scales that product would round to float16.
Scales are therefore stored as float32 (they hold lowbit's float16/bfloat16 scale values
exactly), and the decompressed weights equal ``QuantizedTensor.dequantize()`` bit for bit. vLLM
and transformers cast scales to the model dtype on load; a spec whose ``scale_dtype`` is the
model dtype (``:scale=bfloat16`` for a bf16 model) keeps that cast exact as well.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.export._write import atomic_folder
from lowbit.formats.float import FloatFormat
from lowbit.formats.int import IntFormat
from lowbit.export._roles import refuse_extras
from lowbit.io import INDEX, MANIFEST, WEIGHTS, read_manifest
from lowbit.packing import pack
from lowbit.export._ct_sparse import check_format, sparsity_config
from lowbit.export._ct_sparse import compress as compress_sparse
from lowbit.export._sparse import fold_mask, warn_dense
from lowbit.qtensor import CORE_ROLES, QuantizedTensor, unpack_mask
from lowbit.schemes import describe
from lowbit.spec import PerTensor, QuantSpec, tile_of

SUPPORTED = ("int4/int8 and uint4/uint8 (integer zero) per tensor, channel, group or block as pack-quantized; "
             "fp8_e4m3fn per tensor, channel, group or block as float-quantized; groups must divide the input dim")

log = logging.getLogger(__name__)
_FP8 = FloatFormat(4, 3, special="fn")
_SKIP_FILES = {MANIFEST, "config.json", INDEX}


@dataclass(frozen=True)
class Layer:
    """How one quantized weight is stored: its module, compressed-tensors format and weight args."""

    module: str
    format: str  # "pack-quantized" or "float-quantized"
    args: str  # QuantizationArgs as sorted JSON, so that equal schemes share a config group

    @property
    def strategy(self) -> str:
        return json.loads(self.args)["strategy"]


def export(path: Path, out: Path, overwrite: bool = False, sparse_format: str = "dense") -> Path:
    """Write the lowbit folder ``path`` as a compressed-tensors model folder ``out``; returns ``out``.

    Every quantized weight is checked before anything is written; a scheme compressed-tensors
    cannot hold exactly raises ``LowbitError`` quoting it. ``sparse_format``: "dense" (default),
    "sparse-bitmask" or "sparse-24-bitmask" (float pruned models only; see the module docstring).
    """
    path, out = Path(path), Path(out)
    check_format(sparse_format)
    manifest = read_manifest(path)
    if manifest["model"]["kind"] != "hf" or not (path / "config.json").is_file():
        raise LowbitError(f"{path} holds no Hugging Face model (config.json); compressed-tensors exports need one, "
                          "e.g. a model quantized with `lowbit quantize`")
    refuse_extras(manifest, "compressed-tensors", allow=("mask",))
    if not manifest["quantized"] and not manifest["masks"]:
        raise LowbitError(f"{path} holds no quantized or pruned weights; there is nothing for compressed-tensors "
                          "to store")
    if sparse_format != "dense":
        _check_sparse(path, manifest, sparse_format)
    modules, tied = _skeleton(path, manifest)
    layers = {key: plan_layer(key, meta, modules) for key, meta in manifest["quantized"].items()}
    _warn_scale_cast(manifest)
    config = _config(path, manifest, list(layers.values()), modules)
    with atomic_folder(out, overwrite) as tmp:
        pruned, (zeros, total) = _write_weights(path, tmp, manifest, layers, tied, sparse_format)
        if sparse_format == "dense":
            warn_dense("compressed-tensors", pruned)
        else:
            sparsity = zeros / total
            config["quantization_config"] = {"quant_method": "compressed-tensors", "version": "0.14.0",
                                             "sparsity_config": sparsity_config(
                                                 sparse_format, [k[:-len(".weight")] for k in manifest["masks"]],
                                                 sparsity)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in sorted(path.iterdir()):  # tokenizer, generation config, chat template
            if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
    return out


def _check_sparse(path: Path, manifest: dict[str, Any], sparse_format: str) -> None:
    if manifest["quantized"]:
        raise LowbitError(f"{path} is quantized; compressed-tensors' {sparse_format} format is written for float pruned "
                          "models only (its sparse + quantized stacks are gone from current readers); export it with "
                          "sparse_format='dense' (the default)")
    if not manifest["masks"]:
        raise LowbitError(f"{path} has no pruned weights for {sparse_format}; export it with sparse_format='dense'")
    odd = [k for k in manifest["masks"] if not k.endswith(".weight")]
    if odd:
        raise LowbitError(f"{odd[0]} is not a module's weight, which {sparse_format} stores; use sparse_format='dense'")


def _skeleton(path: Path, manifest: dict[str, Any]) -> tuple[dict[str, nn.Module], set[str]]:
    """Modules of the model (built on the meta device, no memory) and the keys HF drops as tied."""
    from lowbit.hf.load import _model_class, transformers

    tf = transformers()
    config = tf.AutoConfig.from_pretrained(str(path))
    cls = getattr(tf, manifest["model"]["class"], None) or _model_class(tf, config)
    with torch.device("meta"):
        model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
    return dict(model.named_modules()), set(getattr(model, "all_tied_weights_keys", None) or {})


def _warn_scale_cast(manifest: dict[str, Any]) -> None:
    """Readers that cast scales to a 16-bit model dtype round scales stored in another dtype."""
    dtype = manifest["model"]["dtype"]
    others = sorted({m["spec"]["scale_dtype"] for m in manifest["quantized"].values()} - {dtype})
    if dtype in ("float16", "bfloat16") and others:
        log.warning("transformers and vLLM's int kernels cast weight scales to the model dtype %s, which rounds "
                    "this model's %s scales; quantize with :scale=%s to serve exactly what lowbit computes",
                    dtype, "/".join(others), dtype)


# --- what each weight becomes --------------------------------------------------------------
def plan_layer(key: str, meta: dict[str, Any], modules: dict[str, nn.Module]) -> Layer:
    """The storage of the quantized tensor ``key``, or a ``LowbitError`` naming why there is none."""
    if "same_as" in meta:
        raise LowbitError(f"{key} is tied to the quantized {meta['same_as']}; compressed-tensors cannot tie "
                          "quantized weights; leave one of them unquantized")
    module_name, _, param = key.rpartition(".")
    module = modules.get(module_name)
    if param != "weight" or not isinstance(module, (nn.Linear, nn.Embedding)) or len(meta["shape"]) != 2:
        kind = type(module).__name__ if module is not None else "no module"
        raise LowbitError(f"{key} ({kind}, shape {meta['shape']}) cannot be exported: compressed-tensors "
                          "quantizes the 2-D weight of nn.Linear and nn.Embedding modules only")
    spec = QuantSpec.from_dict(meta["spec"])
    fmt, args = weight_args(spec, meta["shape"][0], meta["shape"][1], key)
    return Layer(module_name, fmt, json.dumps(args, sort_keys=True))


def weight_args(spec: QuantSpec, rows: int, cols: int, key: str = "weight") -> tuple[str, dict[str, Any]]:
    """(format, QuantizationArgs dict) that hold ``spec`` exactly on a (rows, cols) weight."""
    f = spec.format
    tr, tc = (min(t, n) for t, n in zip(tile_of(spec.granularity, rows, cols), (rows, cols)))
    if isinstance(f, IntFormat) and f.bits in (4, 8) and (f.symmetric or f.zero == "int"):
        return "pack-quantized", {"num_bits": f.bits, "type": "int", "symmetric": f.symmetric,
                                  **_row_strategy(spec, tc, cols, key), "dynamic": False, "actorder": None}
    if f == _FP8:
        if isinstance(spec.granularity, PerTensor) or (tr, tc) == (rows, cols):
            strategy: dict[str, Any] = {"strategy": "tensor", "group_size": None}
        elif tr == 1:
            strategy = _row_strategy(spec, tc, cols, key)
        else:
            strategy = {"strategy": "block", "group_size": None, "block_structure": [tr, tc]}
        return "float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, **strategy,
                                   "dynamic": False, "actorder": None}
    raise LowbitError(f"{key}: {describe(spec)} cannot be stored exactly in compressed-tensors; supported: {SUPPORTED}")


def _row_strategy(spec: QuantSpec, tc: int, cols: int, key: str) -> dict[str, Any]:
    if tc == cols:
        return {"strategy": "channel", "group_size": None}
    if cols % tc == 0:
        return {"strategy": "group", "group_size": tc}
    fits = [f"g{g}" for g in (16, 32, 64, 128, 256) if g < cols and cols % g == 0] + ["channel"]
    raise LowbitError(f"{key}: {describe(spec)} leaves a partial last group ({cols} input columns, groups of {tc}) "
                      f"and compressed-tensors needs whole groups; quantize with {', '.join(fits[:-1])} or channel")


def _config(path: Path, manifest: dict[str, Any], layers: list[Layer], modules: dict[str, nn.Module]) -> dict:
    """The source config.json with the model dtype spelled out and a ``quantization_config``."""
    quantized = {layer.module for layer in layers}
    ignore = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in quantized)
    config = json.loads((path / "config.json").read_text())
    config.setdefault("dtype", manifest["model"]["dtype"])
    config.pop("quantization_config", None)  # lowbit's own
    if layers:  # a float pruned model is a plain dense folder
        config["quantization_config"] = quantization_config(layers, ignore)
    return config


def quantization_config(layers: list[Layer], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json: one config group per (format, args)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for layer in sorted(layers, key=lambda x: x.module):
        groups.setdefault((layer.format, layer.args), []).append(layer.module)
    formats = {fmt for fmt, _ in groups}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {"targets": targets, "weights": json.loads(args), "input_activations": None,
                           "output_activations": None, "format": fmt}
            for i, ((fmt, args), targets) in enumerate(groups.items())
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


# --- tensors -----------------------------------------------------------------------------
def compress(qt: QuantizedTensor, layer: Layer) -> dict[str, Tensor]:
    """compressed-tensors parameters (without the module prefix) of one quantized weight."""
    rows, cols = qt.matrix_shape
    scale = qt.scale
    if layer.strategy in ("channel", "group"):
        scale = _down_rows(scale, qt.tile[0], rows)  # (rows, n_groups)
    elif layer.strategy == "tensor":
        scale = scale.reshape(1)
    scale = scale.to(torch.float32).contiguous()
    if layer.format == "float-quantized":
        return {"weight": qt.codes().view(torch.float8_e4m3fn).reshape(qt.shape), "weight_scale": scale}
    bits = qt.spec.format.bits
    out = {"weight_packed": pack_int32(qt.codes(), bits), "weight_scale": scale,
           "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}
    if qt.zero is not None:
        zero = _down_rows(qt.zero, qt.tile[0], rows).to(torch.uint8)  # (rows, n_groups) codes
        out["weight_zero_point"] = pack_int32(zero.t(), bits).t().contiguous()  # packed along rows
    return out


def _down_rows(grid: Tensor, tile_rows: int, rows: int) -> Tensor:
    """A (ceil(rows/tile_rows), g) grid as one entry per row, (rows, g)."""
    return grid.repeat_interleave(tile_rows, dim=0)[:rows]


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """(rows, cols) unsigned codes -> (rows, ceil(cols·bits/32)) int32, compressed-tensors' packing.

    Code ``j`` of a row sits at bits ``[j·bits, (j+1)·bits)`` of the row's little-endian bit
    stream, which is lowbit's byte packing read as little-endian int32 words (``bits`` in 4, 8).
    """
    rows, cols = codes.shape
    padded = torch.cat([codes, codes.new_zeros(rows, -cols % (32 // bits))], dim=1)
    b = pack(padded.reshape(-1), bits).reshape(rows, -1, 4).to(torch.int64)  # (rows, words, 4) bytes
    words = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _write_weights(path: Path, tmp: Path, manifest: dict[str, Any], layers: dict[str, Layer],
                   tied: set[str], sparse_format: str = "dense") -> tuple[list[str], tuple[int, int]]:
    """Convert shard by shard under the input's file names; an index when the input had one.

    Returns the keys of the pruned weights written dense, and (pruned, total) weights of those
    written in a sparse format.
    """
    index = path / INDEX
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    weight_map: dict[str, str] = {}
    total = 0
    pruned: list[str] = []
    counts = [0, 0]  # pruned, total
    for shard in shards:
        tensors = load_file(str(path / shard))
        if sparse_format != "dense":
            tensors = _sparse(tensors, manifest, sparse_format, counts)
        tensors = _convert(tensors, manifest, layers, tied, pruned)
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index.is_file():
        text = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        (tmp / INDEX).write_text(text + "\n")
    return sorted(pruned), (counts[0], counts[1])


def _sparse(tensors: dict[str, Tensor], manifest: dict[str, Any], sparse_format: str,
            counts: list[int]) -> dict[str, Tensor]:
    """One shard's float pruned weights and their masks -> the sparse format's tensors."""
    for key, m in manifest["masks"].items():
        if key not in tensors and m["tensor"] not in tensors:
            continue  # in another shard
        if key not in tensors or m["tensor"] not in tensors:
            raise LowbitError(f"the weight and the mask of {key} are in different shards of the folder, which "
                              f"{sparse_format} cannot pair; export it with sparse_format='dense'")
        keep = unpack_mask(tensors.pop(m["tensor"]), tuple(m["shape"]))
        weight = tensors.pop(key)
        tensors.update(compress_sparse(key[:-len(".weight")], weight, keep, sparse_format))
        counts[0] += int((~keep).sum())
        counts[1] += keep.numel()
    return tensors


def _convert(tensors: dict[str, Tensor], manifest: dict[str, Any], layers: dict[str, Layer],
             tied: set[str], pruned: list[str]) -> dict[str, Tensor]:
    """One shard's lowbit tensors -> compressed-tensors tensors; masked weights densified, float
    masks dropped (the weights hold their zeros); the keys of both go into ``pruned``."""
    out: dict[str, Tensor] = {}
    for key, layer in layers.items():
        if f"{key}.codes" not in tensors:
            continue  # stored in another shard
        parts = {r: tensors.pop(f"{key}.{r}") for r in (*CORE_ROLES, "mask") if f"{key}.{r}" in tensors}
        qt = QuantizedTensor.from_tensors(manifest["quantized"][key], parts)
        if qt.mask is not None:
            pruned.append(key)
        qt = fold_mask(qt, key, "compressed-tensors")
        out.update({f"{layer.module}.{name}": t for name, t in compress(qt, layer).items()})
    for key, m in manifest["masks"].items():
        if tensors.pop(m["tensor"], None) is not None:
            pruned.append(key)
    names: dict[str, list[str]] = {}  # a tied tensor is written under the names HF keeps
    for alias, source in manifest["aliases"].items():
        names.setdefault(source, [source]).append(alias)
    for source, group in names.items():
        if source in tensors:
            t = tensors.pop(source)
            keep = [n for n in group if n not in tied] or [source]
            out.update({n: t if i == 0 else t.clone() for i, n in enumerate(keep)})
    out.update(tensors)
    return out

