"""``lowbit demo``: SmolLM2-135M before and after quantization, side by side."""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROMPT = "Explain in one sentence what quantization does to a neural network."


def run_demo(console: Console, scheme: str, windows: int, seq_len: int, out: Path | None,
             source: str = "smollm2-135m") -> dict:
    """Load, quantize, save, reload, evaluate both, print the table; returns the numbers.

    ``source`` is SmolLM2-135M by default; any causal LM that ``load_model`` accepts works.
    """
    from lowbit import api
    from lowbit.eval import eval_text, evaluate, token_windows
    from lowbit.hf.load import load_lowbit, load_model
    from lowbit.report import bits_per_weight, folder_bytes, greedy, weight_bytes
    from lowbit.schemes import describe, parse_scheme

    spec = parse_scheme(scheme)
    with console.status(f"loading {source}"):
        original = load_model(source)
    model, tok = original.model, original.tokenizer
    quant = copy.deepcopy(model)
    t0 = time.perf_counter()
    api.quantize(quant, spec)
    q_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        folder = out or Path(tmp) / "quantized"
        api.save(quant, folder, tokenizer=tok, overwrite=out is not None)
        size = folder_bytes(folder / "model.safetensors")
        reloaded = load_lowbit(folder).model  # evaluate what was saved, not what is in memory
    ids = token_windows(tok, eval_text(None), seq_len, windows)
    after = evaluate(reloaded, ids, reference=model)  # one forward of each model per window
    numbers = {
        "model": original.name, "scheme": describe(spec), "windows": int(ids.shape[0]), "seq_len": seq_len,
        "before": {"ppl": after["ref_ppl"], "bytes": weight_bytes(model)},
        "after": {**after, "bytes": size, "bits_per_weight": bits_per_weight(reloaded), "quantize_seconds": q_seconds},
    }
    _print(console, numbers)
    console.print(f"[bold]prompt[/]: {PROMPT}")
    console.print(f"[bold]fp32[/]:    {greedy(model, tok, PROMPT)}")
    console.print(f"[bold]lowbit[/]:  {greedy(reloaded, tok, PROMPT)}")
    return numbers


def _print(console: Console, n: dict) -> None:
    b, a = n["before"], n["after"]
    table = Table(title=f"{n['model']}: {n['windows']}×{n['seq_len']} tokens of the pydoc evaluation half")
    for col in ("model", "perplexity", "KL", "size", "bits/w*", "time s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    table.add_row("fp32", f"{b['ppl']:.3f}", "0", _mib(b["bytes"]), "32", "-")
    table.add_row(n["scheme"], f"{a['ppl']:.3f}", f"{a['kl']:.4f}", _mib(a["bytes"]),
                  f"{a['bits_per_weight']:.3f}", f"{a['quantize_seconds']:.1f}")
    console.print(table)
    console.print(f"KL: mean KL(P_fp32 || P_quantized), nats/token. size: model.safetensors. time: quantization.\n"
                  f"* bits per quantized weight, scales and zeros included; embeddings and lm_head stay fp32. "
                  f"Evaluation took {a['seconds']:.0f} s for both models.")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
