"""At the same bits per weight, is a 50%-sparse 4-bit model better than a dense 3-bit one? Paired,
window by window, with 95% intervals.

    python3 bench/sparse_vs_dense.py [--windows 32] [--samples 32] [--seq-len 512]

On SmolLM2-135M, calibrated on ``--samples`` pydoc windows, this process builds:

* ``sparse+int4``: SparseGPT's joint pruning and quantization, ``uint4:g64+s=50%`` (the kept
  weights' 4-bit codes, a 1-bit mask, an fp16 scale and a 4-bit zero per 64: 3.31 bits/weight);
* ``sparse 2:4+int4``: the same at ``uint4:g64+s=2:4``;
* ``dense int3``: GPTQ at ``uint3:g64`` (3 bits, fp16 scale and 3-bit zero per 64: 3.30 bits/weight);
* ``dense int3 hqq``: GPTQ at ``uint3_fz:g64:hqq`` (float zero, HQQ's zero search: lowbit's best
  dense 3-bit grid, 3.50 bits/weight);

then scores fp32 and each model on the same ``--windows`` windows of the pydoc evaluation half
and of English prose (out of domain). The difference against ``dense int3`` is paired window by
window (``bench/gptq_paired.py``'s estimator): the per-token log-perplexity difference with ±1.96
standard errors over windows. Bits per weight count every stored bit (codes, scales, zeros,
masks). Writes the section of BENCHMARKS.md between the sparse-vs-dense markers and
``bench/out/sparse-vs-dense.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_section  # noqa: E402
from corpora import prose_split  # noqa: E402
from gptq_paired import Z95, paired, per_window  # noqa: E402

import lowbit  # noqa: E402
from lowbit.calib import calibration_windows  # noqa: E402
from lowbit.eval import eval_text, token_windows  # noqa: E402
from lowbit.hf.load import load_model  # noqa: E402
from lowbit.report import bits_per_weight  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- sparse-vs-dense:begin -->", "<!-- sparse-vs-dense:end -->"
CELLS = {  # name -> (scheme, method)
    "sparse+int4": ("uint4:g64+s=50%", "sparsegpt"),
    "sparse 2:4+int4": ("uint4:g64+s=2:4", "sparsegpt"),
    "dense int3": ("uint3:g64", "gptq"),
    "dense int3 hqq": ("uint3_fz:g64:hqq", "gptq"),
}
BASE = "dense int3"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=32, help="evaluation windows per corpus")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    fp32, tok = loaded.model.eval(), loaded.tokenizer
    calib = calibration_windows(tok, "pydoc", args.samples, args.seq_len)
    models, meta = {"fp32": fp32}, {}
    for name, (scheme, method) in CELLS.items():
        t0 = time.perf_counter()
        models[name] = lowbit.quantize(copy.deepcopy(fp32), scheme, method=method, calib=calib, progress=False)
        meta[name] = {"scheme": scheme, "method": method, "seconds": time.perf_counter() - t0,
                      "bits_per_weight": bits_per_weight(models[name])}
        print(name, json.dumps(meta[name]), flush=True)
    result = {"samples": args.samples, "seq_len": args.seq_len, "cells": meta}
    for corpus, text in (("pydoc", eval_text(None)), ("prose", prose_split()[1])):
        windows = token_windows(tok, text, args.seq_len, args.windows)
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        scores = per_window(models, windows)
        result[corpus] = {"windows": windows.shape[0], "ppl": {k: math.exp(sum(v["nll"]) / tokens) for k, v in scores.items()},
                          "kl": {k: sum(v["kl"]) / tokens for k, v in scores.items()},
                          "vs_base": {k: paired(scores[k]["nll"], scores[BASE]["nll"], tokens)
                                      for k in CELLS if k != BASE}}
        print(corpus, json.dumps(result[corpus]), flush=True)
    out = HERE / "out" / "sparse-vs-dense.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    write_markdown(result, args)


def write_markdown(r: dict, args: argparse.Namespace, path: Path = HERE.parent / "BENCHMARKS.md") -> None:
    lines = [MARK_BEGIN, "### Sparse 4-bit against dense 3-bit at the same bits per weight", "",
             f"Reproduce: `python3 bench/sparse_vs_dense.py --windows {args.windows} --samples {args.samples} "
             f"--seq-len {args.seq_len}`. SmolLM2-135M, calibrated on {r['samples']} pydoc windows of {r['seq_len']} "
             "tokens; every model scored on the same windows. \"− dense int3\" is the paired per-token "
             "log-perplexity difference against GPTQ `uint3:g64` (negative: better), ± the 95% interval over "
             f"windows. Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.", "",
             "| model | scheme, method | bits/weight | seconds | corpus | ppl | KL | − dense int3 (log ppl) |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for corpus in ("pydoc", "prose"):
        s = r[corpus]
        lines.append(f"| fp32 | - | 32 | - | {corpus} | {s['ppl']['fp32']:.2f} | 0 | - |")
        for name, m in r["cells"].items():
            diff = "-" if name == BASE else f"{s['vs_base'][name][0]:+.4f} ± {Z95 * s['vs_base'][name][1]:.4f}"
            lines.append(f"| {name} | `{m['scheme']}`, {m['method']} | {m['bits_per_weight']:.3f} | {m['seconds']:.0f} "
                         f"| {corpus} | {s['ppl'][name]:.2f} | {s['kl'][name]:.3f} | {diff} |")
    lines += ["", MARK_END]
    write_section(path, MARK_BEGIN, MARK_END, lines)


if __name__ == "__main__":
    main()
