"""The ``lowbit`` command: formats, quantize, eval, demo.

Bad input prints one line naming the problem and the fix, and exits with code 2.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lowbit.errors import LowbitError
from lowbit.cli_demo import mib
from lowbit.schemes import presets

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress trained PyTorch and Hugging Face models.")
console = Console()


@app.command()
def formats(as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table.")) -> None:
    """Every registered number format with its bits, range and value table."""
    from lowbit.formats import all_formats

    rows = [_format_row(name, fmt) for name, fmt in all_formats().items()]
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table("name", "family", "bits", "max", "symmetric", "values")
    for r in rows:
        vals = ", ".join(f"{v:g}" for v in r["values"][:9]) + (", ..." if len(r["values"]) > 9 else "")
        table.add_row(r["name"], r["family"], str(r["bits"]), f"{r['max']:g}", str(r["symmetric"]), vals)
    console.print(table)


def _format_row(name: str, fmt) -> dict:
    import torch

    v = fmt.values()
    finite = sorted(set(v[torch.isfinite(v)].tolist()))
    extra = {k: x for k, x in fmt.to_dict().items() if k not in ("family", "bits", "symmetric")}
    return {"name": name, "family": fmt.family, "bits": fmt.bits, "max": fmt.max,
            "symmetric": fmt.symmetric, "block": fmt.fixed_block, "scale": fmt.scale_storage,
            "params": extra, "values": finite}


@app.command()
def quantize(
    model: str = typer.Argument(..., help="HF model folder, .gguf file or smollm2-135m."),
    scheme: str = typer.Option(..., "--scheme", "-s", help=f"A preset ({', '.join(presets())}) or a spec "
                               "string FORMAT[:tensor|channel|gN|bRxC][:mse][:scale=DTYPE], e.g. uint4_fz:g32."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    method: str = typer.Option("rtn", "--method", help="rtn (round-to-nearest) or nupes (power exponent search)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", "-g", help="Override the group size."),
    scale_search: Optional[str] = typer.Option(None, "--scale-search", help="minmax, mse or lpP (e.g. lp3)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (trusted only)."),
    evaluate: bool = typer.Option(False, "--eval", help="Report perplexity and KL before and after."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="--eval text file (default: pydoc eval half)."),
    seq_len: int = typer.Option(512, "--seq-len", help="--eval tokens per window."),
    windows: int = typer.Option(32, "--windows", help="--eval number of windows."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the numbers to this JSON file."),
) -> None:
    """Quantize MODEL with SCHEME and save it to OUT (add --eval for the before/after report)."""
    from lowbit import api
    from lowbit.apply import data_free_methods
    from lowbit.compare import check_eval_args, check_fits
    from lowbit.eval import eval_text
    from lowbit.hf.load import load_lowbit, load_model
    from lowbit.report import bits_per_weight, folder_bytes
    from lowbit.schemes import describe, parse_scheme

    if method not in data_free_methods():
        raise LowbitError(f"unknown method {method!r}; available: {', '.join(data_free_methods())}")
    spec = parse_scheme(scheme, group_size, scale_search)
    if out.exists() and not overwrite:
        raise LowbitError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    _check_writable(report)
    text = None
    if evaluate:  # check everything --eval needs before the long work starts
        check_eval_args(seq_len, windows)
        text = eval_text(corpus)
    loaded = load_model(model, allow_pickle=allow_pickle)
    if evaluate:
        if loaded.tokenizer is None:
            raise LowbitError(f"{model} has no tokenizer files, so --eval cannot tokenize text; drop --eval")
        check_fits(loaded.model, seq_len)
    original = copy.deepcopy(loaded.model) if evaluate else None
    t0 = time.perf_counter()
    api.quantize(loaded.model, spec, method=method)
    seconds = time.perf_counter() - t0
    api.save(loaded.model, out, tokenizer=loaded.tokenizer, overwrite=overwrite)
    numbers = {"model": loaded.name, "scheme": describe(spec), "method": method, "out": str(out),
               "bits_per_weight": bits_per_weight(loaded.model), "bytes": folder_bytes(out), "quantize_seconds": seconds}
    table = Table("model", "scheme", "method", "bits/weight", "size on disk", "seconds")
    table.add_row(loaded.name, describe(spec), method, f"{numbers['bits_per_weight'] or 0:.3f}",
                  mib(numbers["bytes"]), f"{seconds:.1f}")
    console.print(table)
    console.print(f"saved to {out}")
    if evaluate:
        from lowbit.cli_demo import print_comparison
        from lowbit.compare import compare

        reloaded = load_lowbit(out).model  # evaluate what was saved, not what is in memory
        numbers["eval"] = compare(original, reloaded, loaded.tokenizer, out, seconds, text,
                                  str(corpus) if corpus else "pydoc evaluation half", seq_len, windows)
        print_comparison(console, numbers["eval"], title=loaded.name, scheme=describe(spec))
    if report is not None:
        report.write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help="Model: HF folder, .gguf, lowbit folder or smollm2-135m."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="UTF-8 text file (default: pydoc eval half)."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    windows: Optional[int] = typer.Option(None, "--windows", help="Number of windows (default: all)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Original model, to report KL."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (trusted only)."),
) -> None:
    """Perplexity of MODEL (and KL against --reference) on non-overlapping windows."""
    from lowbit.compare import check_eval_args, check_fits
    from lowbit.eval import eval_text, evaluate, token_windows
    from lowbit.hf.load import load_model

    check_eval_args(seq_len, windows)
    text = eval_text(corpus)
    loaded = load_model(model, allow_pickle=allow_pickle)
    if loaded.tokenizer is None:
        raise LowbitError(f"{model} has no tokenizer files; save the tokenizer next to the model")
    ref = load_model(reference, allow_pickle=allow_pickle).model if reference else None
    check_fits(loaded.model, seq_len, ref)
    ids = token_windows(loaded.tokenizer, text, seq_len, windows)
    result = evaluate(loaded.model, ids, reference=ref, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
        return
    table = Table(*result.keys())
    table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in result.values()))
    console.print(table)


@app.command()
def inspect(folder: Path = typer.Argument(..., help="A folder saved by lowbit.")) -> None:
    """Show what a lowbit folder holds: every quantized tensor with its spec and bits."""
    from lowbit.io import read_manifest
    from lowbit.schemes import describe
    from lowbit.spec import QuantSpec

    if not folder.exists():
        raise LowbitError(f"folder {folder} does not exist; give a folder written by `lowbit quantize`")
    manifest = read_manifest(folder)
    table = Table("tensor", "shape", "layout", "spec", title=f"{folder} (lowbit {manifest['lowbit_version']})")
    for key, meta in sorted(manifest["quantized"].items()):
        spec = describe(QuantSpec.from_dict(meta["spec"]))
        table.add_row(key, "×".join(map(str, meta["shape"])), meta["layout"], spec)
    console.print(table)
    console.print(f"{len(manifest['quantized'])} quantized tensors; model {manifest['model']['class']}")


@app.command()
def demo(
    scheme: str = typer.Option("w4g64-asym", "--scheme", "-s", help="Preset or spec string."),
    windows: int = typer.Option(32, "--windows", help="Evaluation windows of --seq-len tokens."),
    seq_len: int = typer.Option(512, "--seq-len"),
    out: Optional[Path] = typer.Option(None, "--out", help="Keep the quantized folder here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    model: str = typer.Option("smollm2-135m", "--model", help="Another causal LM to demo on."),
) -> None:
    """Quantize SmolLM2-135M, evaluate before and after, and show one generation from each."""
    from lowbit.cli_demo import run_demo

    run_demo(console, scheme=scheme, windows=windows, seq_len=seq_len, out=out, source=model, overwrite=overwrite)


def _check_writable(path: Optional[Path]) -> None:
    if path is not None and not path.parent.is_dir():
        raise LowbitError(f"cannot write {path}: folder {path.parent} does not exist")


def main() -> None:
    """Entry point: usage errors are click's (exit 2); ``LowbitError`` is one line, exit 2."""
    try:
        app()
    except LowbitError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
