"""Side by side: lowbit against the peer toolkits, on one model, one set of windows, one evaluator.

    python3 bench/compare.py [--model smollm2-135m | PATH] [--tools lowbit,hqq,...] [--bits 4,3,8]
                             [--only 'GLOB,...'] [--windows 16] [--samples 32] [--seq-len 512]
                             [--decode-tokens 64] [--fresh] [--report-only] [--markdown BENCHMARKS.md]

Every tool runs in a child process, in its own virtual environment (``bench/peers/setup.sh TOOL``;
lowbit and the fp32 reference in this one), through its runner ``bench/peers/<tool>_quant.py``.
Each runner loads the same fp32 folder, quantizes, saves in the tool's own format, and scores
the live quantized model with ``bench/peers/peer_eval.py``: lowbit's perplexity and KL code on
the same windows (the pydoc evaluation half and out-of-domain English prose) against the same
cached fp32 log-probabilities, greedy decode speed, quantize seconds and peak RSS, all measured
the same way. Calibrated tools use the same calibration windows (checked by hash).

Finished cells are kept in ``bench/out/compare/<model>/cells/`` and not recomputed unless
``--fresh``; a failed or refused cell is recorded with the tool's error, never dropped. Writes
one table per bit width, the lowbit/peer ratios and a Pareto plot (bits per weight against
perplexity) into ``--markdown`` (default BENCHMARKS.md, between per-model markers).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_cells import CELLS, SPARSE_CELLS, TOOLS, Cell  # noqa: E402
from compare_report import write_report  # noqa: E402
from compare_work import model_key, prepare  # noqa: E402
from peers._main import ERROR_PREFIX  # noqa: E402
from rss import measure  # noqa: E402

VENVS = HERE / ".venvs"


def runner(cell: Cell) -> list[str]:
    """The command line of ``cell``'s tool: its venv's python (lowbit's own for lowbit and fp32) and script."""
    if cell.tool in ("lowbit", "fp32"):
        return [sys.executable, str(HERE / "peers" / "lowbit_quant.py")]
    python = VENVS / cell.tool / "bin" / "python"
    return [str(python), str(HERE / "peers" / f"{cell.tool}_quant.py")]


def run_cell(cell: Cell, folder: Path, work: Path, out: Path, timeout: float) -> dict:
    """Run one cell to a result dict; a failure becomes ``{"error": ...}`` with the tool's own last words."""
    base = {"key": cell.key, "tool": cell.tool, "method": cell.method, "bits": cell.bits, "args": list(cell.args)}
    cmd = runner(cell)
    if not Path(cmd[0]).exists():
        return {**base, "error": f"not installed: run bench/peers/setup.sh {cell.tool}"}
    cmd += ["--model", str(folder), "--work", str(work), "--out", str(out), *cell.args]
    m = measure(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}, timeout=timeout)
    if m["timed_out"]:
        return {**base, "error": f"no result within {timeout:.0f} s", "stderr_tail": m["stderr_tail"][-3000:]}
    if m["returncode"] != 0 or not (out / "result.json").exists():
        said = [ln[len(ERROR_PREFIX):] for ln in m["stderr_tail"].splitlines() if ln.startswith(ERROR_PREFIX)]
        reason = said[-1] if said else f"exit status {m['returncode']}: {m['stderr_tail'].strip().splitlines()[-1:]}"
        return {**base, "error": reason[:400], "stderr_tail": m["stderr_tail"][-3000:]}
    result = json.loads((out / "result.json").read_text())
    return {**base, **result, "wall_seconds": m["seconds"], "tree_peak_rss_mb": m["peak_rss_mb"]}


def select(cells: list[Cell], tools: list[str], bits: list[int], only: list[str] | None) -> list[Cell]:
    """Cells of the chosen tools and bit widths (the fp32 row always), narrowed by key globs."""
    chosen = [c for c in cells if c.tool == "fp32" or (c.tool in tools and c.bits in bits)]
    if only:
        chosen = [c for c in chosen if c.tool == "fp32" or any(fnmatch.fnmatch(c.key, g) for g in only)]
    return chosen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a lowbit short name or a local Hugging Face folder")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {', '.join(TOOLS)}")
    ap.add_argument("--bits", default="4,3,8", help="tables to run: comma-separated bit widths")
    ap.add_argument("--suite", choices=("quant", "sparse"), default="quant",
                    help="quant: the bit-width tables; sparse: one-shot pruning (50%% and 2:4), its own section")
    ap.add_argument("--only", default=None, help="comma-separated globs over cell keys, e.g. 'lowbit:rtn*'")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per corpus")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--ood", type=Path, default=None,
                    help="out-of-domain text file (default: the English prose corpus, bench/corpora.py)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "out" / "compare")
    ap.add_argument("--markdown", type=Path, default=HERE.parent / "BENCHMARKS.md")
    ap.add_argument("--plot-dir", type=Path, default=HERE / "plots")
    ap.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before a cell is recorded as failed")
    ap.add_argument("--fresh", action="store_true", help="recompute finished cells")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from finished cells")
    args = ap.parse_args(argv)

    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown:
        ap.error(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(TOOLS)}")
    bits = [int(b) for b in args.bits.split(",")]
    if args.suite == "sparse":
        bits = [32]
    cells = select(SPARSE_CELLS if args.suite == "sparse" else CELLS, tools, bits,
                   args.only.split(",") if args.only else None)
    key = model_key(args.model)
    root = args.out_dir / key
    stem = f"w{args.windows}-l{args.seq_len}-n{args.samples}-d{args.decode_tokens}"
    results_dir = root / "cells"
    results_dir.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        if args.ood is None:
            from corpora import prose_split

            ood_text, ood_name = prose_split()[1], "prose"
        else:
            ood_text, ood_name = args.ood.read_text(encoding="utf-8"), args.ood.name
        print(f"[compare] preparing {key}: windows, calibration, fp32 reference", flush=True)
        work = prepare(args.model, root, args.windows, args.seq_len, args.samples, args.decode_tokens,
                       ood_text, ood_name)
        folder = Path(json.loads((work / "work.json").read_text())["folder"])
        for i, cell in enumerate(cells, 1):
            path = results_dir / f"{cell.key.replace(':', '__')}-{stem}.json"
            if path.exists() and not args.fresh:
                continue
            print(f"[compare] {i}/{len(cells)} {cell.key}", flush=True)
            out = root / "runs" / path.stem
            result = run_cell(cell, folder, work, out, args.cell_timeout)
            if "error" in result:
                print(f"[compare] {cell.key}: {result['error']}", flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
            os.replace(tmp, path)
            import shutil

            shutil.rmtree(out, ignore_errors=True)  # quantized models are large; the result is kept

    results = {}
    for cell in cells:
        path = results_dir / f"{cell.key.replace(':', '__')}-{stem}.json"
        if path.exists():
            results[cell.key] = json.loads(path.read_text())
    command = "python3 bench/compare.py" + ("" if args.model == "smollm2-135m" else f" --model {args.model}") + \
        ("" if args.suite == "quant" else " --suite sparse --tools lowbit,llmcompressor") + \
        f" --windows {args.windows} --samples {args.samples} --seq-len {args.seq_len} --decode-tokens {args.decode_tokens}"
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    sparse = args.suite == "sparse"
    write_report(cells, results, key=f"{key}-sparse" if sparse else key, command=command, machine=machine,
                 markdown=args.markdown, plot_dir=args.plot_dir, work_meta=_work_meta(root, stem),
                 title=f"## Pruning side by side on {key}: lowbit and llm-compressor" if sparse else None)


def _work_meta(root: Path, stem: str) -> dict:
    path = root / f"work-{stem}" / "work.json"
    return json.loads(path.read_text()) if path.exists() else {}


if __name__ == "__main__":
    main()
