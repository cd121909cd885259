"""Layer-adaptive sparsity on an LLM: does §15's rate-distortion allocation beat uniform, ERK and
LAMP at the same overall sparsity? Paired, window by window, with 95% intervals.

    python3 bench/pruning_rd_llm.py [--sparsity 0.5] [--windows 16] [--samples 32] [--rd-tokens 256]
                                    [--rd-steps 10] [--methods magnitude,wanda]

On SmolLM2-135M, calibrated on ``--samples`` pydoc windows of 512 tokens, this process prunes the
fp32 model once per (method, allocation): ``lowbit.quantize(model, "s=50%", method=M,
allocation=A, calib=...)``, every targeted layer (the block linears; the tied head is left out).
Allocations: ``uniform``, ``erk``, ``lamp`` and ``rd`` (curves on ``--rd-tokens`` calibration tokens at
``--rd-steps`` amounts). Every model is scored on the same ``--windows`` windows of the pydoc
evaluation half and of English prose (out of domain): perplexity, KL against fp32, and the paired
per-token log-perplexity difference against the same method with ``uniform`` (negative: better),
± the 95% interval over windows (``bench/gptq_paired.py``'s estimator). Seconds include the
allocation (rd's curves). Writes ``bench/out/pruning-rd-<method>.json`` per method and the section of
BENCHMARKS.md between the pruning-rd markers from every such file (a run of one method keeps the
others' rows; each method is compared with its own uniform cell of the same run).
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
from lowbit.nn.reference import masks  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- pruning-rd:begin -->", "<!-- pruning-rd:end -->"
ALLOCATIONS = ("uniform", "erk", "lamp", "rd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per corpus")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rd-tokens", type=int, default=256)
    ap.add_argument("--rd-steps", type=int, default=10)
    ap.add_argument("--methods", default="magnitude,wanda")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m")
    fp32, tok = loaded.model.eval(), loaded.tokenizer
    calib = calibration_windows(tok, "pydoc", args.samples, args.seq_len)
    models, meta = {"fp32": fp32}, {}
    for method in args.methods.split(","):
        for allocation in ALLOCATIONS:
            name = f"{method} {allocation}"
            options = {"allocation": allocation}
            if allocation == "rd":
                options.update(rd_tokens=args.rd_tokens, rd_steps=args.rd_steps)
            data = calib if method != "magnitude" or allocation == "rd" else None
            t0 = time.perf_counter()
            models[name] = lowbit.quantize(copy.deepcopy(fp32), f"s={args.sparsity:.0%}", method=method, calib=data,
                                           progress=allocation == "rd", **options)
            found = [m for _, _, m in masks(models[name])]
            ratios = [float((~m).float().mean()) for m in found]
            meta[name] = {"method": method, "allocation": allocation, "seconds": time.perf_counter() - t0,
                          "pruned_layers": len(found), "min_ratio": min(ratios), "max_ratio": max(ratios),
                          "sparsity": sum(int((~m).sum()) for m in found) / sum(
                              p.numel() for n, p in fp32.named_parameters() if ".layers." in n and p.ndim == 2)}
            print(name, json.dumps(meta[name]), flush=True)
    result = {"samples": args.samples, "seq_len": args.seq_len, "sparsity": args.sparsity, "cells": meta}
    for corpus, text in (("pydoc", eval_text(None)), ("prose", prose_split()[1])):
        windows = token_windows(tok, text, args.seq_len, args.windows)
        tokens = windows.shape[0] * (windows.shape[1] - 1)
        scores = per_window(models, windows)
        result[corpus] = {"windows": windows.shape[0],
                          "ppl": {k: math.exp(sum(v["nll"]) / tokens) for k, v in scores.items()},
                          "kl": {k: sum(v["kl"]) / tokens for k, v in scores.items()},
                          "vs_uniform": {k: paired(scores[k]["nll"], scores[f"{m['method']} uniform"]["nll"], tokens)
                                         for k, m in meta.items() if m["allocation"] != "uniform"}}
        print(corpus, json.dumps(result[corpus]), flush=True)
    for method in args.methods.split(","):
        keep = {k for k, m in meta.items() if m["method"] == method}
        one = {**result, "cells": {k: v for k, v in meta.items() if k in keep}, "args": vars(args)}
        for corpus in ("pydoc", "prose"):
            one[corpus] = {"windows": result[corpus]["windows"],
                           **{f: {k: v for k, v in result[corpus][f].items() if k in keep | {"fp32"}}
                              for f in ("ppl", "kl", "vs_uniform")}}
        out = HERE / "out" / f"pruning-rd-{method}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(one, indent=1))
    write_markdown(sorted((HERE / "out").glob("pruning-rd-*.json")))


def write_markdown(files: list[Path], path: Path = HERE.parent / "BENCHMARKS.md") -> None:
    runs = [json.loads(f.read_text()) for f in files]
    lines = [MARK_BEGIN, "### Layer-adaptive sparsity on SmolLM2-135M: rate-distortion (§15) against uniform, ERK, LAMP",
             "", "Reproduce, one command per method: " + "; ".join(
                 f"`python3 bench/pruning_rd_llm.py --sparsity {a['sparsity']} --windows {a['windows']} --samples "
                 f"{a['samples']} --rd-tokens {a['rd_tokens']} --rd-steps {a['rd_steps']} --methods {a['methods']}`"
                 for a in {r["args"]["methods"]: r["args"] for r in runs}.values()) + ". "
             "Every block linear pruned to the sparsity overall (the tied head is left out); calibration on pydoc "
             "windows of 512 tokens; every model scored on the same 512-token windows of the pydoc evaluation half "
             "and of prose. \"− uniform\" is the paired per-token log-perplexity difference against the same method "
             "with uniform allocation in the same run (negative: better), ± the 95% interval over windows. Seconds "
             "include the allocation (rd: its curves). rd's curves prune by the method's own criterion (magnitude: "
             f"|w|; wanda: |w|·‖x‖ per row). Machine: {platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}.", "",
             "| method | allocation | layer ratios | seconds | pydoc ppl | − uniform | prose ppl | − uniform |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    if runs:
        lines.append(f"| fp32 | - | - | - | {runs[0]['pydoc']['ppl']['fp32']:.2f} | - | "
                     f"{runs[0]['prose']['ppl']['fp32']:.2f} | - |")
    for r in runs:
        p, q = r["pydoc"], r["prose"]
        for name, m in r["cells"].items():
            diffs = ["-", "-"] if m["allocation"] == "uniform" else \
                [f"{s['vs_uniform'][name][0]:+.4f} ± {Z95 * s['vs_uniform'][name][1]:.4f}" for s in (p, q)]
            lines.append(f"| {m['method']} | {m['allocation']} | {m['min_ratio']:.2f}–{m['max_ratio']:.2f} "
                         f"({m['pruned_layers']} layers) | {m['seconds']:.0f} | {p['ppl'][name]:.2f} | {diffs[0]} | "
                         f"{q['ppl'][name]:.2f} | {diffs[1]} |")
    lines += ["", MARK_END]
    write_section(path, MARK_BEGIN, MARK_END, lines)


if __name__ == "__main__":
    main()
