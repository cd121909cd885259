"""``lowbit demo`` and the before/after table that it and ``lowbit quantize --eval`` print."""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROMPT = "Explain in one sentence what quantization does to a neural network."


def run_demo(console: Console, scheme: str, windows: int, seq_len: int, out: Path | None,
             source: str = "smollm2-135m", overwrite: bool = False) -> dict:
    """Load, quantize, save, reload, evaluate both, print the table; returns the numbers.

    ``source`` is SmolLM2-135M by default; any causal LM that ``load_model`` accepts works.
    """
    from lowbit.api import quantize, save
    from lowbit.compare import check_eval_args, compare
    from lowbit.errors import LowbitError
    from lowbit.eval import eval_text
    from lowbit.hf.load import load_lowbit, load_model
    from lowbit.nn import kernel_counts
    from lowbit.report import timed_greedy
    from lowbit.schemes import describe, parse_scheme

    spec = parse_scheme(scheme)
    check_eval_args(seq_len, windows)
    if out is not None and out.exists() and not overwrite:
        raise LowbitError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    with console.status(f"loading {source}"):
        original = load_model(source)
    model, tok = original.model, original.tokenizer
    quant = copy.deepcopy(model)
    t0 = time.perf_counter()
    quantize(quant, spec)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        folder = out or Path(tmp) / "quantized"
        save(quant, folder, tokenizer=tok, overwrite=overwrite)
        # evaluate what was saved, not what is in memory: the float32 fake-quant model for the
        # scores (batched windows run fastest in float32), the packed model for generation
        reloaded = load_lowbit(folder, packed=False).model
        numbers = compare(model, reloaded, tok, folder, seconds, eval_text(None), seq_len=seq_len, windows=windows)
        packed = load_lowbit(folder).model
    print_comparison(console, numbers, title=original.name, scheme=describe(spec))
    console.print(f"[bold]prompt[/]: {PROMPT}")
    text, before = timed_greedy(model, tok, PROMPT)
    console.print(f"[bold]original[/]:  {text}")
    text, after = timed_greedy(packed, tok, PROMPT)
    console.print(f"[bold]quantized[/]: {text}")
    kernels = ", ".join(f"{n} layers on {k}" for k, n in sorted(kernel_counts(packed).items())) or "no packed layers"
    console.print(f"decode speed: {before:.1f} tok/s original, {after:.1f} tok/s quantized ({kernels}); "
                  "python3 bench/decode.py measures it properly")
    numbers["decode_tok_s"] = {"before": before, "after": after}
    return numbers


def print_comparison(console: Console, numbers: dict, title: str, scheme: str) -> None:
    b, a = numbers["before"], numbers["after"]
    table = Table(title=f"{title}: {numbers['windows']}×{numbers['seq_len']} tokens of the {numbers['corpus']}")
    for col in ("model", "perplexity", "KL", "size", "bits/w*", "time s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row(b["dtype"], f"{b['ppl']:.3f}", "0", mib(b["bytes"]), "-", "-")
    table.add_row(scheme, f"{a['ppl']:.3f}", f"{a['kl']:.4f}", mib(a["bytes"]),
                  "float" if a["bits_per_weight"] is None else f"{a['bits_per_weight']:.3f}",
                  f"{a['quantize_seconds']:.1f}")
    console.print(table)
    console.print(f"KL: mean KL(P_original || P_quantized) in nats/token. size: weights on disk. time: quantization.\n"
                  f"* bits per quantized weight, scales and zeros included (tensors the plan skips keep their dtype). "
                  f"Evaluating both models took {numbers['eval_seconds']:.0f} s.")


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
