"""The body of ``lowbit quantize``: data-free recipes in memory, the others through ``engine.pipeline``.

No method is named here: a recipe comes from ``--method a+b`` (with the methods' own options,
``lowbit.recipe.options``) or ``--recipe FILE.yaml``.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.table import Table

from lowbit.cli_demo import mib
from lowbit.errors import LowbitError


@dataclass
class QuantizeArgs:
    model: str
    scheme: str
    out: Path
    method: str = "rtn"
    recipe: Optional[Path] = None
    options: dict = field(default_factory=dict)  # method options from the command line
    group_size: Optional[int] = None
    scale_search: Optional[str] = None
    calib: str = "pydoc"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: Optional[int] = None
    max_memory: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    allow_pickle: bool = False
    evaluate: bool = False
    corpus: Optional[Path] = None
    windows: int = 32
    report: Optional[Path] = None


def run_quantize(console: Console, a: QuantizeArgs) -> None:
    from lowbit.compare import check_eval_args
    from lowbit.eval import eval_text
    from lowbit.schemes import describe_scheme, parse_tensor_scheme

    recipe = _recipe(a)
    scheme = parse_tensor_scheme(a.scheme, a.group_size, a.scale_search)
    if a.out.exists() and not a.overwrite:
        raise LowbitError(f"output folder {a.out} already exists; choose another --out or pass --overwrite")
    if a.report is not None and not a.report.parent.is_dir():
        raise LowbitError(f"cannot write {a.report}: folder {a.report.parent} does not exist")
    text = None
    if a.evaluate:  # check everything --eval needs before the long work starts
        check_eval_args(a.seq_len, a.windows)
        text = eval_text(a.corpus)
    if recipe.needs_data:
        numbers, original, tokenizer, name = _calibrated(console, a, scheme, recipe)
    else:
        numbers, original, tokenizer, name = _data_free(console, a, scheme, recipe)
    numbers.update({"model": name, "scheme": describe_scheme(scheme), "method": recipe.name,
                    "recipe": recipe.to_dict(), "out": str(a.out)})
    _print_table(console, numbers)
    if a.evaluate:
        from lowbit.cli_demo import print_comparison
        from lowbit.compare import check_fits, compare
        from lowbit.hf.load import load_lowbit, load_model

        original = original if original is not None else load_model(a.model, allow_pickle=a.allow_pickle).model
        check_fits(original, a.seq_len)
        reloaded = load_lowbit(a.out, packed=False).model  # what was saved, as the float32 fake-quant model
        numbers["eval"] = compare(original, reloaded, tokenizer, a.out, numbers["quantize_seconds"], text,
                                  str(a.corpus) if a.corpus else "pydoc evaluation half", a.seq_len, a.windows)
        print_comparison(console, numbers["eval"], title=name, scheme=describe_scheme(scheme))
    if a.report is not None:
        a.report.write_text(json.dumps(numbers, indent=1, sort_keys=True, default=str) + "\n")


def _recipe(a: QuantizeArgs):
    from lowbit.recipe.recipe import from_methods, load_recipe

    if a.recipe is None:
        return from_methods(a.method, a.options)
    if a.options or a.method != "rtn":
        raise LowbitError("--recipe gives the methods and their options; drop --method and method options, or "
                          "put them in the recipe file")
    return load_recipe(a.recipe)


def _data_free(console: Console, a: QuantizeArgs, scheme: Any, recipe: Any) -> tuple[dict, Any, Any, str]:
    from lowbit.api import quantize, save
    from lowbit.compare import check_fits
    from lowbit.hf.load import load_model
    from lowbit.report import bits_per_weight, folder_bytes

    loaded = load_model(a.model, allow_pickle=a.allow_pickle)
    if a.evaluate:
        if loaded.tokenizer is None:
            raise LowbitError(f"{a.model} has no tokenizer files, so --eval cannot tokenize text; drop --eval")
        check_fits(loaded.model, a.seq_len)
    original = copy.deepcopy(loaded.model) if a.evaluate else None
    t0 = time.perf_counter()
    quantize(loaded.model, scheme, method=recipe)
    seconds = time.perf_counter() - t0
    report = loaded.model.__dict__.pop("lowbit_report")
    _print_run(console, report, f"{recipe.name}: no calibration data")
    save(loaded.model, a.out, tokenizer=loaded.tokenizer, overwrite=a.overwrite)
    numbers = {"bits_per_weight": bits_per_weight(loaded.model), "bytes": folder_bytes(a.out),
               "quantize_seconds": seconds, "stages": _stage_numbers(report)}
    return numbers, original, loaded.tokenizer, loaded.name


def _calibrated(console: Console, a: QuantizeArgs, scheme: Any, recipe: Any) -> tuple[dict, Any, Any, str]:
    from lowbit.engine.pipeline import CalibratedRun, run_calibrated
    from lowbit.report import folder_bytes, manifest_bits_per_weight

    args = CalibratedRun(a.model, scheme, a.out, recipe, a.calib, a.samples, a.seq_len, a.seed,
                         a.batch_size, a.resume, a.max_memory, a.overwrite, a.allow_pickle)
    result = run_calibrated(args, say=console.print)
    report = result["report"]
    table = _print_run(console, report, f"{recipe.name}: {result['windows'][0]} windows × {result['windows'][1]} "
                       f"tokens of {a.calib}", show=False)
    table.add_row("peak memory", f"{result['peak_rss_bytes'] / 2**30:.2f} GB (forecast "
                  f"{result['forecast'].peak_bytes / 2**30:.2f} GB)")
    console.print(table)
    numbers = {"bits_per_weight": manifest_bits_per_weight(a.out), "bytes": folder_bytes(a.out),
               "quantize_seconds": result["seconds"], "peak_rss_bytes": result["peak_rss_bytes"],
               "forecast_bytes": result["forecast"].peak_bytes, "forecast_seconds": result["forecast"].seconds,
               "streamed": result["streamed"], "fallbacks": report.fallbacks, "stages": _stage_numbers(report)}
    return numbers, None, result["tokenizer"], a.model


def _print_run(console: Console, report: Any, title: str, show: bool = True) -> Table:
    table = Table("run", "", title=title)
    for k, v in report.rows():
        table.add_row(k, v)
    if show:
        console.print(table)
    return table


def _stage_numbers(report: Any) -> list[dict]:
    return [{"method": s.method, "options": s.options, "targeted": s.targeted, "done": s.done,
             "seconds": round(s.seconds, 3), "blocks": s.blocks} for s in report.stages]


def _bits(bits: float | None) -> str:
    """Bits per quantized weight, or what a run without quantized tensors (pruning only) stored."""
    return "float" if bits is None else f"{bits:.3f}"


def _print_table(console: Console, numbers: dict) -> None:
    table = Table("model", "scheme", "method", "bits/weight", "size on disk", "seconds")
    table.add_row(numbers["model"], numbers["scheme"], numbers["method"], _bits(numbers["bits_per_weight"]),
                  mib(numbers["bytes"]), f"{numbers['quantize_seconds']:.1f}")
    console.print(table)
    console.print(f"saved to {numbers['out']}")
