"""Export to GGUF for llama.cpp: every quantized weight in the GGUF type that holds it exactly.

No weight is requantized: lowbit's codes and scales are repacked bit for bit into llama.cpp's
32-element blocks (``lowbit.export._gguf_blocks``, with the table of the specs each GGUF type
holds), so llama.cpp dequantizes to exactly what ``QuantizedTensor.dequantize`` gives.

Unquantized tensors keep their dtype (F32, F16, BF16); 1-D tensors (norms, biases) go as F32.
Architectures: Llama (``LlamaForCausalLM``, llama.cpp ``llama``) and Qwen2 (``qwen2``). llama.cpp's
``llama`` applies rotary embeddings to interleaved pairs where Hugging Face rotates halves, so
the rows of ``attn_q`` and ``attn_k`` are reordered within each head (row ``2i + j`` of a head
is HF row ``j·head_dim/2 + i``); Qwen2 keeps HF's order. The tokenizer (byte-level BPE) comes
from the folder's ``tokenizer.json`` (see ``lowbit.export._gguf_vocab``).

Every export is read back with ``gguf.GGUFReader``, dequantized with ``gguf.quants`` and
compared for equality with lowbit's own dequantization before it is renamed into place.

Sparse models are densified with a warning (GGUF has no sparse type; ``lowbit.export._sparse``):
float pruned weights keep their zeros; a quantized + masked weight has each pruned code set to its
block's exact zero code (Q8_0/Q4_0/Q5_0: the middle code), and is refused where the type has none
(Q4_1/Q5_1's ``d·n + m`` is 0 for almost no ``n``).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export._gguf_blocks import SPECS, codes, dequantize, gguf_type, pack_blocks
from lowbit.export._sparse import fold_mask, warn_dense
from lowbit.export._write import atomic_file
from lowbit.qtensor import CORE_ROLES, QuantizedTensor

log = logging.getLogger(__name__)

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SUPPORTED = f"{SPECS}; {' and '.join(ARCHS)}"
_PERMUTED = re.compile(r"^blk\.\d+\.attn_(q|k)\.(weight|bias)$")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LowbitError("GGUF export needs the gguf package; install it with: pip install gguf") from None
    return gguf


def llama_rows(n: int, n_head: int) -> Tensor:
    """Row order of llama.cpp's q/k for ``n`` HF rows: GGUF row ``h·hd + 2i + j`` = HF ``h·hd + j·hd/2 + i``."""
    hd = n // n_head
    return torch.arange(n).reshape(n_head, 2, hd // 2).transpose(1, 2).reshape(n)  # (n_head, hd/2, 2)


# --- the folder's tensors, in GGUF names -----------------------------------------------------
@dataclass
class Entry:
    """One GGUF tensor: ``data`` as written and where its exact values come from."""

    name: str
    data: np.ndarray
    qtype: str
    source: QuantizedTensor | Tensor
    rows: Tensor | None  # llama q/k row order, or None

    def values(self) -> np.ndarray:
        """The float32 values llama.cpp must read back: lowbit's dequantization, reordered."""
        x = dequantize(self.source) if isinstance(self.source, QuantizedTensor) else self.source.float()
        return (x if self.rows is None else x[self.rows]).numpy()


def _sources(path: Path, manifest: dict) -> dict[str, QuantizedTensor | Tensor]:
    """State-dict key -> its QuantizedTensor or plain tensor; tied keys share one object.

    Masked weights come densified (``lowbit.export._sparse``): pruned codes folded to exact
    zero codes, float masks dropped (the weights hold their zeros), with one warning.
    """
    from lowbit.io import read_weights

    weights = read_weights(path)
    out: dict[str, Any] = {}
    quantized = manifest["quantized"]
    for key in sorted(quantized, key=lambda k: "same_as" in quantized[k]):  # sources before their twins
        meta = quantized[key]
        if "same_as" in meta:
            out[key] = out[meta["same_as"]]
            continue
        roles = {r: weights.pop(f"{key}.{r}") for r in (*CORE_ROLES, "mask") if f"{key}.{r}" in weights}
        out[key] = fold_mask(QuantizedTensor.from_tensors(meta, roles), key, "gguf")
    for m in manifest["masks"].values():
        weights.pop(m["tensor"], None)
    warn_dense("gguf", sorted([*manifest["masks"], *(k for k, m in quantized.items() if "mask" in m.get("roles", ()))]))
    out.update(weights)
    for alias, source in manifest["aliases"].items():
        out[alias] = out[source]
    return out


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _entry(name: str, key: str, source: QuantizedTensor | Tensor, rows: Tensor | None) -> Entry:
    if isinstance(source, QuantizedTensor):
        qtype = gguf_type(key, source)
        data = pack_blocks(codes(source), source.scale, source.zero, qtype)
    elif source.dim() == 1 or source.dtype not in (torch.float16, torch.bfloat16):
        qtype, data = "F32", source.float().numpy()
    elif source.dtype == torch.float16:
        qtype, data = "F16", source.numpy()
    else:
        qtype, data = "BF16", source.view(torch.int16).numpy()
    if rows is not None:
        data = data[rows.numpy()]
    return Entry(name, np.ascontiguousarray(data), qtype, source, rows)


def entries(path: Path, manifest: dict, arch: str, config: Any) -> list[Entry]:
    """Every tensor of the folder under its GGUF name; a tied lm_head is left to token_embd."""
    gguf = _gguf()
    sources = _sources(path, manifest)
    if sources.get("lm_head.weight") is not None and sources.get("lm_head.weight") is sources.get(
            "model.embed_tokens.weight"):
        del sources["lm_head.weight"]  # llama.cpp uses token_embd as the output when output.weight is absent
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    heads = {"q": config.num_attention_heads, "k": config.num_key_value_heads or config.num_attention_heads}
    out = []
    for key in sorted(sources, key=_natural):
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"{path}: tensor {key} has no GGUF name in llama.cpp's {arch}; is it a stock "
                              f"{', '.join(ARCHS)}?")
        m = _PERMUTED.match(name)
        rows = llama_rows(sources[key].shape[0], heads[m.group(1)]) if arch == "llama" and m else None
        out.append(_entry(name, key, sources[key], rows))
    return out


# --- metadata --------------------------------------------------------------------------------
def architecture(path: Path, manifest: dict) -> str:
    cls = manifest["model"].get("class")
    if manifest["model"].get("kind") != "hf" or cls not in ARCHS:
        raise LowbitError(f"{path} holds a {cls}; gguf export supports "
                          f"{', '.join(f'{c} ({a})' for c, a in ARCHS.items())}")
    return ARCHS[cls]


def _rope(config: Any) -> tuple[float, str, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type", "default")), params


def add_hparams(w: Any, arch: str, config: Any) -> None:
    """Hyperparameters llama.cpp reads for ``llama`` and ``qwen2``."""
    gguf = _gguf()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(config.num_key_value_heads or heads)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    theta, kind, params = _rope(config)
    w.add_rope_freq_base(theta)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    elif kind != "default":
        raise LowbitError(f"rope type {kind!r} is not exported to GGUF yet; supported: default, linear")


def _file_type(items: list[Entry]) -> int:
    """llama.cpp's ``general.file_type``: the type holding the most 2-D weights."""
    gguf = _gguf()
    counts: dict[str, int] = {}
    for e in items:
        if len(e.source.shape) == 2:
            n = e.source.numel if isinstance(e.source, QuantizedTensor) else e.source.numel()
            counts[e.qtype] = counts.get(e.qtype, 0) + n
    top = max(counts, key=counts.__getitem__) if counts else "F32"
    return int(gguf.LlamaFileType["ALL_F32" if top == "F32" else f"MOSTLY_{top}"])


# --- write and verify ------------------------------------------------------------------------
def export(path: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the lowbit folder ``path`` as one GGUF file at ``out`` (atomic); returns ``out``."""
    from lowbit.export._gguf_vocab import add_vocab, read_vocab
    from lowbit.export._roles import refuse_extras
    from lowbit.hf.load import transformers
    from lowbit.io import read_manifest

    gguf = _gguf()
    path, out = Path(path), Path(out)
    manifest = read_manifest(path)
    refuse_extras(manifest, "gguf", allow=("mask",))
    arch = architecture(path, manifest)
    config = transformers().AutoConfig.from_pretrained(str(path))
    vocab = read_vocab(path, config)
    items = entries(path, manifest, arch, config)
    with atomic_file(out, overwrite) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(path.name)
        add_hparams(w, arch, config)
        add_vocab(w, vocab)
        w.add_file_type(_file_type(items))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for e in items:
            w.add_tensor(e.name, e.data, raw_dtype=gguf.GGMLQuantizationType[e.qtype])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        verify(tmp, items)
    log.info("wrote %s: %d tensors, %s", out, len(items), arch)
    return out


def verify(file: Path, items: list[Entry]) -> None:
    """Read ``file`` back with gguf's reader; every tensor must dequantize to lowbit's values exactly."""
    gguf = _gguf()
    got = {t.name: t for t in gguf.GGUFReader(file).tensors}
    for e in items:
        t = got.get(e.name)
        want = e.values()
        if t is None or t.tensor_type.name != e.qtype:
            raise LowbitError(f"GGUF read-back of {file}: {e.name} is missing or not {e.qtype}")
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if not np.array_equal(values, want):
            raise LowbitError(f"GGUF read-back of {file}: {e.name} differs from lowbit's dequantization; "
                              "this is a lowbit bug, please report it")
