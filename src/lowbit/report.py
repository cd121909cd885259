"""Numbers for the before/after report: size on disk, bits per weight, generation."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.nn.reference import quantized_tensors


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes of every file in a folder (or one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of an unquantized model's state: unique tensors, tied ones counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def bits_per_weight(model: nn.Module) -> float | None:
    """Average stored bits per weight over the quantized tensors (every stored role: codes, scales,
    zeros, masks, low-rank factors, input scales)."""
    bits = numel = 0
    for _, _, qt, _ in quantized_tensors(model):
        bits += qt.nbits()
        numel += qt.numel
    return bits / numel if numel else None


def greedy(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """One greedy completion; chat models get their chat template."""
    return timed_greedy(model, tokenizer, prompt, max_new_tokens)[0]


def timed_greedy(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> tuple[str, float]:
    """One greedy completion and its decode speed in tokens/s (prompt prefill included)."""
    import time

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - t0
    made = out.shape[1] - ids.shape[1]
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip(), made / seconds


def manifest_bits_per_weight(folder: str | os.PathLike) -> float | None:
    """Average stored bits per quantized weight of a saved folder (every ``<key>.<role>`` tensor),
    read from file headers only."""
    import json
    from math import prod

    from safetensors import safe_open

    from lowbit.io import INDEX, WEIGHTS, read_manifest

    folder = Path(folder)
    quantized = {k: m for k, m in read_manifest(folder)["quantized"].items() if "same_as" not in m}
    files = [folder / WEIGHTS] if (folder / WEIGHTS).is_file() else \
        [folder / f for f in sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))]
    bits = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():
                if name.rpartition(".")[0] in quantized:
                    sl = fh.get_slice(name)
                    bits += prod(sl.get_shape()) * torch.finfo(getattr(torch, _DTYPES[sl.get_dtype()])).bits \
                        if sl.get_dtype() in _DTYPES else prod(sl.get_shape()) * 8
    numel = sum(prod(m["shape"]) for m in quantized.values())
    return bits / numel if numel else None


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
