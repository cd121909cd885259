"""SmolLM2-135M exported to GGUF and run by llama.cpp: its perplexity against lowbit's own.

    bench/peers/setup_llamacpp.sh          # once: builds llama-cpp-python (CPU) in bench/.venvs/llamacpp
    python3 bench/gguf_llamacpp.py [--windows 16] [--seq-len 512] [--schemes int8:g32,int4:g32,...]

For each scheme (and fp32, unquantized) lowbit quantizes SmolLM2-135M with round-to-nearest,
saves it, and exports it with ``lowbit.export.export(folder, "gguf", file)`` (which itself reads
the file back and checks every tensor dequantizes to lowbit's values exactly). Then the same
token windows of the pydoc evaluation half are scored twice: by lowbit (the functions that
``lowbit.eval.perplexity`` sums, on the saved folder loaded as the float32 fake-quant model,
lowbit's reference numerics) and by llama.cpp (``bench/peers/llamacpp_ppl.py`` in the
llama-cpp-python venv, fed lowbit's token ids, logits at every position). llama.cpp multiplies
quantized weights by activations it quantizes to 8 bits (Q8_0/Q8_1), so small differences are
expected; the table reports them, with the share of positions where both pick the same next token.
Writes the section of BENCHMARKS.md between the gguf markers.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_section  # noqa: E402

import lowbit  # noqa: E402
from lowbit.eval import eval_text, token_windows  # noqa: E402
from lowbit.eval.perplexity import next_token_logprobs, token_nll  # noqa: E402
from lowbit.export import export  # noqa: E402
from lowbit.hf.load import load_lowbit, load_model  # noqa: E402

OUT = HERE / "out" / "gguf"
PYTHON = HERE / ".venvs" / "llamacpp" / "bin" / "python"
CHILD = HERE / "peers" / "llamacpp_ppl.py"
MARK_BEGIN, MARK_END = "<!-- gguf:begin -->", "<!-- gguf:end -->"
SCHEMES = ["int8:g32", "int4:g32", "uint4_fz:g32", "int5:g32", "uint5_fz:g32"]


@torch.inference_mode()
def lowbit_scores(model, windows: torch.Tensor) -> dict:
    """Per-window NLL and arg-max next tokens of ``model`` (what ``lowbit.eval.perplexity`` sums)."""
    model.eval()
    start, window_nll, argmax = time.perf_counter(), [], []
    for w in windows:
        logp = next_token_logprobs(model, w[None])  # (1, L-1, V)
        window_nll.append(float(token_nll(logp, w[None]).double().sum()))
        argmax.append(logp[0].argmax(-1).tolist())
    return {"window_nll": window_nll, "argmax": argmax, "seconds": time.perf_counter() - start}


def llamacpp_scores(file: Path, windows_file: Path, threads: int) -> dict:
    """llama.cpp's scores in its own venv; OpenMP threads sleep when idle, as other jobs share the cores."""
    if not PYTHON.exists():
        raise SystemExit(f"no llama-cpp-python venv at {PYTHON.parent.parent}; run bench/peers/setup_llamacpp.sh")
    out = file.with_suffix(".llamacpp.json")
    proc = subprocess.run([str(PYTHON), str(CHILD), "--model", str(file), "--windows", str(windows_file),
                           "--out", str(out), "--threads", str(threads)], capture_output=True, text=True,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp failed on {file}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def run_cell(model, tokenizer, scheme: str | None, windows: torch.Tensor, windows_file: Path, threads: int) -> dict:
    name = scheme or "fp32"
    folder, file = OUT / name.replace(":", "_"), OUT / f"{name.replace(':', '_')}.gguf"
    model = copy.deepcopy(model)
    if scheme is not None:
        lowbit.quantize(model, scheme, progress=False)
    lowbit.save(model, folder, tokenizer=tokenizer, overwrite=True)
    start = time.perf_counter()
    export(folder, "gguf", file, overwrite=True)
    export_seconds = time.perf_counter() - start
    ours = lowbit_scores(load_lowbit(folder, packed=False).model, windows)  # float32 fake-quant
    theirs = llamacpp_scores(file, windows_file, threads)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    ppl = {k: math.exp(sum(r["window_nll"]) / tokens) for k, r in (("lowbit", ours), ("llamacpp", theirs))}
    same = np.mean(np.array(ours["argmax"]) == np.array(theirs["argmax"]))
    diffs = np.array(theirs["window_nll"]) / (windows.shape[1] - 1) - np.array(ours["window_nll"]) / (windows.shape[1] - 1)
    return {"scheme": name, "ppl_lowbit": ppl["lowbit"], "ppl_llamacpp": ppl["llamacpp"],
            "rel_diff": ppl["llamacpp"] / ppl["lowbit"] - 1, "top1_agree": float(same),
            "max_window_nll_diff": float(np.abs(diffs).max()), "file_mib": file.stat().st_size / 2**20,
            "export_seconds": export_seconds, "lowbit_seconds": ours["seconds"],
            "llamacpp_seconds": theirs["seconds"], "llama_cpp_python": theirs["llama_cpp_python"],
            "system_info": theirs["system_info"], "types": _types(file)}


def _types(file: Path) -> str:
    """The GGUF types of the file's 2-D tensors, by count (e.g. ``Q4_1 ×210, F32 ×1``)."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(file).tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def write_markdown(rows: list[dict], args) -> None:
    cmd = (f"python3 bench/gguf_llamacpp.py --windows {args.windows} --seq-len {args.seq_len} --schemes {args.schemes} "
           f"--threads {args.threads}")
    flags = [f.split("=")[0].split(":")[-1].strip() for f in (rows[0]["system_info"] if rows else "").split("|") if f.strip().endswith("= 1")]
    lines = [
        MARK_BEGIN,
        "## GGUF export: llama.cpp runs lowbit's SmolLM2-135M with lowbit's perplexity",
        "",
        f"Reproduce: `bench/peers/setup_llamacpp.sh` once, then `{cmd}` (files kept in `bench/out/gguf/`).",
        f"Each scheme: `lowbit.quantize` (round-to-nearest, default plan: the linears of the 30 blocks; "
        "embeddings stay fp32), `lowbit.save`, `lowbit export --to gguf` (every tensor read back by "
        "gguf's reader equals lowbit's dequantization exactly). Both runtimes score the same "
        f"{args.windows} windows of {args.seq_len} tokens of the pydoc evaluation half, as token ids: lowbit "
        "as the float32 fake-quant model (PyTorch), llama.cpp through llama-cpp-python "
        f"{rows[0]['llama_cpp_python'] if rows else '?'} (CPU build, {args.threads} threads), whose quantized "
        "dot products quantize activations to 8 bits and whose KV cache is fp16; hence small differences. "
        "`top-1` is the share of positions where both predict the same next token; `max Δ nll` the largest "
        f"per-window difference of mean NLL (nats/token). Machine: {platform.machine()}, {os.cpu_count()} cores "
        f"(shared with other jobs: timings are rough), torch {torch.__version__}; llama.cpp CPU features: "
        f"{' '.join(flags)}.",
        "",
        "| scheme | GGUF tensors (2-D) | file | lowbit ppl | llama.cpp ppl | Δ ppl | top-1 | max Δ nll | export s "
        "| lowbit eval s | llama.cpp eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['scheme']}` | {r['types']} | {r['file_mib']:.1f} MiB | {r['ppl_lowbit']:.3f} | "
            f"{r['ppl_llamacpp']:.3f} | {100 * r['rel_diff']:+.2f}% | {100 * r['top1_agree']:.1f}% | "
            f"{r['max_window_nll_diff']:.4f} | {r['export_seconds']:.1f} | {r['lowbit_seconds']:.1f} | "
            f"{r['llamacpp_seconds']:.1f} |")
    lines += ["", "`uint4_fz:g32` reproduces SmolLM2's own Q4_1 weights, hence the fp32 perplexity (see the note at "
              "the top); the 5-bit grids do not contain those 4-bit grid points, hence worse than 4-bit here.",
              "", MARK_END]
    write_section(HERE.parent / "BENCHMARKS.md", MARK_BEGIN, MARK_END, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated; fp32 (unquantized) always runs")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    windows = token_windows(loaded.tokenizer, eval_text(None), args.seq_len, args.windows)  # (n, L)
    windows_file = OUT / f"windows-{args.windows}x{args.seq_len}.npy"
    np.save(windows_file, windows.numpy().astype(np.int32))
    rows = []
    for scheme in [None, *args.schemes.split(",")]:
        print(f"[bench] {scheme or 'fp32'}", flush=True)
        rows.append(run_cell(loaded.model, loaded.tokenizer, scheme, windows, windows_file, args.threads))
        r = rows[-1]
        print(f"[bench]   lowbit {r['ppl_lowbit']:.3f}  llama.cpp {r['ppl_llamacpp']:.3f}  "
              f"({100 * r['rel_diff']:+.2f}%, top-1 {100 * r['top1_agree']:.1f}%)", flush=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    write_markdown(rows, args)


if __name__ == "__main__":
    main()
