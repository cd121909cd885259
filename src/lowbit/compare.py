"""Before/after numbers: perplexity, KL, size on disk, bits per weight, time.

Shared by ``lowbit demo`` and ``lowbit quantize --eval``, which print them: both models see the
same windows, the quantized model is the one reloaded from disk, and each model runs one
forward per window.
"""
from __future__ import annotations

import os
from typing import Any

from torch import nn

from lowbit.errors import LowbitError


def check_eval_args(seq_len: int, windows: int | None) -> None:
    """Refuse window settings that cannot work, before any model is loaded."""
    if seq_len < 2:
        raise LowbitError(f"--seq-len {seq_len} is too small; use at least 2 tokens per window")
    if windows is not None and windows < 1:
        raise LowbitError(f"--windows {windows} must be at least 1")


def check_fits(model: nn.Module, seq_len: int, reference: nn.Module | None = None) -> None:
    """Refuse windows longer than the model's context, and a reference with another vocabulary."""
    config = getattr(model, "config", None)
    ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if ctx is not None and seq_len > ctx:
        raise LowbitError(f"--seq-len {seq_len} is longer than the model's context of {ctx} tokens; use at most {ctx}")
    ref_config = getattr(reference, "config", None)
    if ref_config is not None and getattr(ref_config, "vocab_size", None) != getattr(config, "vocab_size", None):
        raise LowbitError(
            f"the reference's vocabulary ({ref_config.vocab_size}) differs from the model's "
            f"({getattr(config, 'vocab_size', None)}); KL needs the model the quantized one came from"
        )


def compare(original: nn.Module, quantized: nn.Module, tokenizer: Any, folder: str | os.PathLike,
            quantize_seconds: float, text: str, corpus_name: str = "pydoc evaluation half", seq_len: int = 512,
            windows: int | None = 32) -> dict:
    """Numbers for the report; ``folder`` is where ``quantized`` was saved, ``text`` the corpus."""
    from lowbit.eval import evaluate, token_windows
    from lowbit.report import bits_per_weight, folder_bytes, weight_bytes

    check_fits(quantized, seq_len, original)
    ids = token_windows(tokenizer, text, seq_len, windows)
    after = evaluate(quantized, ids, reference=original)
    dtype = str(next(original.parameters()).dtype).removeprefix("torch.")
    return {
        "corpus": corpus_name, "windows": int(ids.shape[0]),
        "seq_len": seq_len, "eval_seconds": after["seconds"],
        "before": {"dtype": dtype, "ppl": after["ref_ppl"], "bytes": weight_bytes(original)},
        "after": {"ppl": after["ppl"], "kl": after["kl"], "bytes": folder_bytes(os.path.join(folder, "model.safetensors")),
                  "bits_per_weight": bits_per_weight(quantized), "quantize_seconds": quantize_seconds},
    }
