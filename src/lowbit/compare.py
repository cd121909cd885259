"""Before/after report: perplexity, KL, size on disk, bits per weight, time.

Shared by ``lowbit demo`` and ``lowbit quantize --eval``: both models see the same windows, the
quantized model is the one reloaded from disk, and each model runs one forward per window.
"""
from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn


def compare(original: nn.Module, quantized: nn.Module, tokenizer: Any, folder: str | os.PathLike,
            quantize_seconds: float, corpus: str | os.PathLike | None = None, seq_len: int = 512,
            windows: int | None = 32) -> dict:
    """Numbers for the report; ``folder`` is where ``quantized`` was saved."""
    from lowbit.eval import eval_text, evaluate, token_windows
    from lowbit.report import bits_per_weight, folder_bytes, weight_bytes

    ids = token_windows(tokenizer, eval_text(corpus), seq_len, windows)
    after = evaluate(quantized, ids, reference=original)
    dtype = str(next(original.parameters()).dtype).removeprefix("torch.")
    return {
        "corpus": str(corpus) if corpus else "pydoc evaluation half", "windows": int(ids.shape[0]),
        "seq_len": seq_len, "eval_seconds": after["seconds"],
        "before": {"dtype": dtype, "ppl": after["ref_ppl"], "bytes": weight_bytes(original)},
        "after": {"ppl": after["ppl"], "kl": after["kl"], "bytes": folder_bytes(os.path.join(folder, "model.safetensors")),
                  "bits_per_weight": bits_per_weight(quantized), "quantize_seconds": quantize_seconds},
    }


def print_comparison(console: Console, numbers: dict, title: str, scheme: str) -> None:
    b, a = numbers["before"], numbers["after"]
    table = Table(title=f"{title}: {numbers['windows']}×{numbers['seq_len']} tokens of the {numbers['corpus']}")
    for col in ("model", "perplexity", "KL", "size", "bits/w*", "time s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row(b["dtype"], f"{b['ppl']:.3f}", "0", _mib(b["bytes"]), "-", "-")
    table.add_row(scheme, f"{a['ppl']:.3f}", f"{a['kl']:.4f}", _mib(a["bytes"]),
                  f"{a['bits_per_weight']:.3f}", f"{a['quantize_seconds']:.1f}")
    console.print(table)
    console.print(f"KL: mean KL(P_original || P_quantized) in nats/token. size: weights on disk. time: quantization.\n"
                  f"* bits per quantized weight, scales and zeros included (tensors the plan skips keep their dtype). "
                  f"Evaluating both models took {numbers['eval_seconds']:.0f} s.")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
