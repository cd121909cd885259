"""The body of ``lowbit quantize``: data-free methods in memory, calibrated ones through ``pipeline``."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
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
    group_size: Optional[int] = None
    scale_search: Optional[str] = None
    calib: str = "pydoc"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    damp: Optional[float] = None  # None: GPTQ's default
    act_order: Optional[bool] = None
    static_groups: bool = False
    batch_size: int = 8
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
    from lowbit.methods import CALIBRATED, all_methods
    from lowbit.schemes import describe, parse_scheme

    if a.method not in all_methods():
        raise LowbitError(f"unknown method {a.method!r}; available: {', '.join(all_methods())}")
    spec = parse_scheme(a.scheme, a.group_size, a.scale_search)
    if a.out.exists() and not a.overwrite:
        raise LowbitError(f"output folder {a.out} already exists; choose another --out or pass --overwrite")
    if a.report is not None and not a.report.parent.is_dir():
        raise LowbitError(f"cannot write {a.report}: folder {a.report.parent} does not exist")
    text = None
    if a.evaluate:  # check everything --eval needs before the long work starts
        check_eval_args(a.seq_len, a.windows)
        text = eval_text(a.corpus)
    if a.method in CALIBRATED:
        numbers, original, tokenizer, name = _calibrated(console, a, spec)
    else:
        numbers, original, tokenizer, name = _data_free(a, spec)
    numbers.update({"model": name, "scheme": describe(spec), "method": a.method, "out": str(a.out)})
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
        print_comparison(console, numbers["eval"], title=name, scheme=describe(spec))
    if a.report is not None:
        a.report.write_text(json.dumps(numbers, indent=1, sort_keys=True, default=str) + "\n")


def _data_free(a: QuantizeArgs, spec: Any) -> tuple[dict, Any, Any, str]:
    from lowbit import api
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
    api.quantize(loaded.model, spec, method=a.method)
    seconds = time.perf_counter() - t0
    api.save(loaded.model, a.out, tokenizer=loaded.tokenizer, overwrite=a.overwrite)
    numbers = {"bits_per_weight": bits_per_weight(loaded.model), "bytes": folder_bytes(a.out),
               "quantize_seconds": seconds}
    return numbers, original, loaded.tokenizer, loaded.name


def _calibrated(console: Console, a: QuantizeArgs, spec: Any) -> tuple[dict, Any, Any, str]:
    from lowbit.algorithms.gptq import GPTQ
    from lowbit.pipeline import CalibratedRun, report_rows, run_calibrated
    from lowbit.report import folder_bytes, manifest_bits_per_weight

    given = {"damp": a.damp, "act_order": a.act_order, "static_groups": True if a.static_groups else None}
    cfg = GPTQ(**{k: v for k, v in given.items() if v is not None})  # the rest: GPTQ's defaults
    options = {"damp": cfg.damp, "act_order": cfg.act_order, "static_groups": cfg.static_groups}
    args = CalibratedRun(a.model, spec, a.out, a.method, options, a.calib, a.samples, a.seq_len, a.seed,
                         a.batch_size, a.resume, a.max_memory, a.overwrite, a.allow_pickle)
    result = run_calibrated(args, say=console.print)
    rows = report_rows(result["report"], cfg.damp)
    table = Table("run", "", title=f"{a.method}: {result['windows'][0]} windows × {result['windows'][1]} tokens "
                  f"of {a.calib}")
    for k, v in rows:
        table.add_row(k, v)
    table.add_row("peak memory", f"{result['peak_rss_bytes'] / 2**30:.2f} GB (forecast "
                  f"{result['forecast'].peak_bytes / 2**30:.2f} GB)")
    console.print(table)
    numbers = {"bits_per_weight": manifest_bits_per_weight(a.out), "bytes": folder_bytes(a.out),
               "quantize_seconds": result["seconds"], "peak_rss_bytes": result["peak_rss_bytes"],
               "forecast_bytes": result["forecast"].peak_bytes, "forecast_seconds": result["forecast"].seconds,
               "streamed": result["streamed"], "fallbacks": result["report"].fallbacks}
    name = a.model
    return numbers, None, result["tokenizer"], name


def _print_table(console: Console, numbers: dict) -> None:
    table = Table("model", "scheme", "method", "bits/weight", "size on disk", "seconds")
    table.add_row(numbers["model"], numbers["scheme"], numbers["method"], f"{numbers['bits_per_weight'] or 0:.3f}",
                  mib(numbers["bytes"]), f"{numbers['quantize_seconds']:.1f}")
    console.print(table)
    console.print(f"saved to {numbers['out']}")
