"""SmolLM2-135M: round-to-nearest against GPTQ, in-domain (pydoc) and out of domain (English prose).

    python3 bench/gptq.py [--windows 16] [--samples 32] [--only CELL,...] [--fresh] [--report-only]

Every cell quantizes with the real CLI in a child process (``lowbit quantize``), measured by
``bench/rss.py`` for wall time and peak RSS, then the saved folder is scored here against cached
fp32 log-probabilities on both corpora: perplexity and KL(P_fp32 ‖ P_quantized). Cells are kept
in ``bench/out/gptq/*.json``; a finished cell is not recomputed unless --fresh is given, so a
killed run resumes. Writes the section of BENCHMARKS.md between the gptq markers: a cell with no
cached result (``--only`` ran others, or ``bench/out`` was cleared) keeps the row it has there,
if that section was made with the same windows, sequence length and samples.

Peer cells (``(peer)``) run the peer's quantizer in its own virtual environment
(``bench/peers/setup.sh hqq`` and ``bench/peers/setup.sh llmcompressor`` first) on one fp32
model folder (``bench/out/smollm2-135m-hf``), and load its dequantized weights into the fp32
model, so they are scored by the same code on the same windows. llm-compressor's GPTQ
calibrates on the windows lowbit's GPTQ cells use (checked by hash). A peer that refuses a
configuration is recorded with its error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import hf_folder, read_section, reference_logprobs, score, write_section  # noqa: E402
from corpora import prose_calibration_file, prose_split  # noqa: E402
from peers._main import ERROR_PREFIX  # noqa: E402
from rss import measure  # noqa: E402

from lowbit.algorithms.gptq import DEFAULT_DAMP  # noqa: E402
from lowbit.calib import calibration_windows  # noqa: E402
from lowbit.eval import eval_text, token_windows  # noqa: E402
from lowbit.hf.load import load_lowbit, load_model  # noqa: E402
from lowbit.report import manifest_bits_per_weight  # noqa: E402

OUT = HERE / "out" / "gptq"
PROSE_CALIB = OUT.parent / "prose-calibration-half.txt"  # corpora.prose_calibration_file writes it
MARK_BEGIN, MARK_END = "<!-- gptq:begin -->", "<!-- gptq:end -->"
PROSE_NAME = ("the evaluation half of out-of-domain English prose (Alice in Wonderland and the Library of Congress "
              "1992 Workshop on Electronic Texts, from the Canterbury corpus in the PyPI sdist brotli==1.2.1; "
              "bench/corpora.py)")
SCHEMES = ["w4g64-asym", "w4g128-asym", "w3g128-asym", "w4g128", "w4g64", "w3g128", "fp4", "nvfp4", "w3g64-asym"]
#: (cell name, scheme, method, extra CLI arguments); GPTQ cells take --samples/--seq-len from the command line
#: the matrix's GPTQ cells use lowbit's defaults (act-order, damp DEFAULT_DAMP), spelled out
MATRIX_ARGS = ["--damp", f"{DEFAULT_DAMP:g}", "--act-order"]
CELLS = [c for s in SCHEMES for c in ((f"{s}/rtn", s, "rtn", []), (f"{s}/gptq", s, "gptq", MATRIX_ARGS))] + [
    ("uint4_fz:g64:hqq/rtn (= HQQ)", "uint4_fz:g64:hqq", "rtn", []),
    ("uint4_fz:g64:hqq/gptq-damp1", "uint4_fz:g64:hqq", "gptq", ["--damp", "1.0"]),
    ("uint4_fz:g64:hqq/gptq-damp1-mix", "uint4_fz:g64:hqq", "gptq", ["--damp", "1.0", "--calib", "pydoc:0.5,self:0.5"]),
    ("uint4_fz:g64:hqq/gptq-damp1-self", "uint4_fz:g64:hqq", "gptq", ["--damp", "1.0", "--calib", "self"]),
    ("uint4_fz:g64:hqq/gptq-damp1-static", "uint4_fz:g64:hqq", "gptq", ["--damp", "1.0", "--static-groups"]),
    ("uint4_fz:g64:hqq/gptq-damp1-actorder", "uint4_fz:g64:hqq", "gptq", ["--damp", "1.0", "--act-order"]),
    ("uint4_fz:g64:hqq/gptq-damp10", "uint4_fz:g64:hqq", "gptq", ["--damp", "10"]),
    ("uint4_fz:g64:hqq/gptq-damp0.1-actorder", "uint4_fz:g64:hqq", "gptq", ["--damp", "0.1", "--act-order"]),
    ("uint4_fz:g64:hqq/gptq-damp10-actorder", "uint4_fz:g64:hqq", "gptq", ["--damp", "10", "--act-order"]),
    ("uint4_fz:g64:hqq/gptq-damp1-prose", "uint4_fz:g64:hqq", "gptq",
     ["--damp", "1.0", "--calib", str(PROSE_CALIB)]),
    ("uint4_fz:g64:hqq/gptq-damp1-128", "uint4_fz:g64:hqq", "gptq", ["--damp", "1.0", "--samples", "128"]),
    ("uint3_fz:g64:hqq/rtn", "uint3_fz:g64:hqq", "rtn", []),
    ("uint3_fz:g64:hqq/gptq-damp1", "uint3_fz:g64:hqq", "gptq", ["--damp", "1.0"]),
    ("w4g64-asym/gptq-damp0.01", "w4g64-asym", "gptq", ["--damp", "0.01"]),
    ("w4g64-asym/gptq-damp0.1", "w4g64-asym", "gptq", ["--damp", "0.1"]),
    ("w4g64-asym/gptq-damp1", "w4g64-asym", "gptq", ["--damp", "1.0"]),
    ("w4g64-asym/gptq-damp10", "w4g64-asym", "gptq", ["--damp", "10"]),
    ("hqq 0.2.8 4-bit g64 (peer)", "hqq:4:g64", "peer:hqq", ["--nbits", "4", "--group", "64"]),
    ("hqq 0.2.8 3-bit g64 (peer)", "hqq:3:g64", "peer:hqq", ["--nbits", "3", "--group", "64"]),
    ("llm-compressor GPTQ w4g64 (peer)", "int4:g64", "peer:llmcompressor", ["--method", "gptq", "--bits", "4", "--group", "64"]),
    ("llm-compressor GPTQ w4g64-asym (peer)", "uint4:g64", "peer:llmcompressor",
     ["--method", "gptq", "--bits", "4", "--group", "64", "--asym"]),
    ("llm-compressor GPTQ w3g64-asym (peer)", "uint3:g64", "peer:llmcompressor",
     ["--method", "gptq", "--bits", "3", "--group", "64", "--asym"]),
    ("llm-compressor GPTQ w4g128 (peer)", "int4:g128", "peer:llmcompressor",
     ["--method", "gptq", "--bits", "4", "--group", "128"]),
    ("llm-compressor RTN w4g64 (peer)", "int4:g64", "peer:llmcompressor", ["--method", "rtn", "--bits", "4", "--group", "64"]),
    ("llm-compressor RTN w4g64-asym (peer)", "uint4:g64", "peer:llmcompressor",
     ["--method", "rtn", "--bits", "4", "--group", "64", "--asym"]),
    # integer zero with the scale (and zero) chosen by least squared error inside GPTQ
    ("uint4:g128:mse/rtn", "uint4:g128:mse", "rtn", []),
    ("uint4:g128:mse/gptq", "uint4:g128:mse", "gptq", MATRIX_ARGS),
    ("uint4:g64:mse/gptq", "uint4:g64:mse", "gptq", MATRIX_ARGS),
    ("uint3:g128:mse/rtn", "uint3:g128:mse", "rtn", []),
    ("uint3:g128:mse/gptq", "uint3:g128:mse", "gptq", MATRIX_ARGS),
    ("uint3:g64:mse/gptq", "uint3:g64:mse", "gptq", MATRIX_ARGS),
    # HQQ's float zero inside GPTQ at g128, against the integer-zero g128 rows above
    ("uint4_fz:g128:hqq/rtn", "uint4_fz:g128:hqq", "rtn", []),
    ("uint4_fz:g128:hqq/gptq", "uint4_fz:g128:hqq", "gptq", MATRIX_ARGS),
    ("uint3_fz:g128:hqq/rtn", "uint3_fz:g128:hqq", "rtn", []),
    ("uint3_fz:g128:hqq/gptq", "uint3_fz:g128:hqq", "gptq", MATRIX_ARGS),
    # llm-compressor's GPTQ settings (damp 0.01, static act-order) in lowbit: same algorithm, same windows
    ("w4g64-asym/gptq-damp0.01-actorder", "w4g64-asym", "gptq", ["--damp", "0.01", "--act-order"]),
    ("w3g64-asym/gptq-damp0.01-actorder", "w3g64-asym", "gptq", ["--damp", "0.01", "--act-order"]),
]
#: peer tools' quantizers: script and the virtual environment bench/peers/setup.sh makes for it
PEERS = {tool: (HERE / "peers" / f"{tool}_quant.py", HERE / ".venvs" / tool / "bin" / "python")
         for tool in ("hqq", "llmcompressor")}
MODEL_FOLDER = OUT.parent / "smollm2-135m-hf"  # the fp32 folder every peer reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows per corpus")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--only", default=None, help="comma-separated cell names")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="only rewrite BENCHMARKS.md from finished cells")
    args = ap.parse_args()
    if args.report_only:
        write_markdown(CELLS, args)
        return
    (OUT / "models").mkdir(parents=True, exist_ok=True)
    prose_calibration_file(PROSE_CALIB)  # the `-prose` cell calibrates on it
    cells = [c for c in CELLS if not args.only or c[0] in args.only.split(",")]
    todo = [c for c in cells if args.fresh or not _path(c[0], args).exists()]
    if todo or args.fresh or not _path("fp32", args).exists():
        loaded = load_model("smollm2-135m")
        corpora = {"pydoc": token_windows(loaded.tokenizer, eval_text(None), args.seq_len, args.windows),
                   "prose": token_windows(loaded.tokenizer, prose_split()[1], args.seq_len, args.windows)}
        refs = {k: reference_logprobs(loaded.model, w) for k, w in corpora.items()}
        if args.fresh or not _path("fp32", args).exists():
            _write(_path("fp32", args), {"cell": "fp32", **{k: score(loaded.model, w, refs[k])
                                                              for k, w in corpora.items()}})
        del loaded
        for cell in todo:
            print(f"[bench] {cell[0]}", flush=True)
            _write(_path(cell[0], args), run_cell(cell, corpora, refs, args))
    write_markdown(CELLS, args)  # every cell: cached results, else the row already in BENCHMARKS.md


def run_cell(cell: tuple, corpora: dict, refs: dict, args) -> dict:
    name, scheme, method, extra = cell
    folder = OUT / "models" / _path(name, args).stem
    if method.startswith("peer:"):
        return run_peer(cell, folder, corpora, refs, args)
    report = folder.with_suffix(".report.json")
    cmd = ["lowbit", "quantize", "smollm2-135m", "--scheme", scheme, "--method", method, "--out", str(folder),
           "--overwrite", "--report", str(report)]
    if folder.with_suffix(".partial").exists():  # a killed cell starts over: a resumed run's time would be partial
        print(f"[bench] {name}: removing the unfinished run {folder.with_suffix('.partial')}", flush=True)
        shutil.rmtree(folder.with_suffix(".partial"))
    samples = int(extra[extra.index("--samples") + 1]) if "--samples" in extra else args.samples
    if method == "gptq":
        cmd += ["--seq-len", str(args.seq_len), *extra]
        if "--samples" not in extra:
            cmd += ["--samples", str(samples)]
    m = measure(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if m["returncode"] != 0:
        raise SystemExit(f"{name} failed:\n{m['stderr_tail']}")
    numbers = json.loads(report.read_text())
    model = load_lowbit(folder).model
    result = {"cell": name, "scheme": scheme, "method": method, "args": extra, "samples": samples,
              "quantize_seconds": numbers["quantize_seconds"], "wall_seconds": m["seconds"],
              "peak_rss_mb": m["peak_rss_mb"], "bpw": manifest_bits_per_weight(folder),
              **{k: score(model, w, refs[k]) for k, w in corpora.items()}}
    shutil.rmtree(folder, ignore_errors=True)
    return result


def run_peer(cell: tuple, folder: Path, corpora: dict, refs: dict, args) -> dict:
    """A peer tool quantizes in its own venv and saves its dequantized weights; scored here like lowbit."""
    name, scheme, method, extra = cell
    tool = method.split(":", 1)[1]
    script, python = PEERS[tool]
    if not python.exists():
        raise SystemExit(f"{name}: no venv at {python.parent.parent}; run bench/peers/setup.sh {tool}")
    cmd = [str(python), str(script), "--model", str(hf_folder("smollm2-135m", MODEL_FOLDER)), "--out", str(folder), *extra]
    calibrated = tool == "llmcompressor" and "gptq" in extra
    if calibrated:
        cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    m = measure(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if m["returncode"] != 0:  # recorded, not left out: the table says the peer could not run it
        reason = [ln[len(ERROR_PREFIX):] for ln in m["stderr_tail"].splitlines() if ln.startswith(ERROR_PREFIX)]
        reason = reason or [f"exit status {m['returncode']} (see stderr_tail)"]
        print(f"[bench] {name} failed: {reason[-1]}", flush=True)
        return {"cell": name, "scheme": scheme, "method": method, "args": extra, "error": reason[-1][:400],
                "stderr_tail": m["stderr_tail"][-3000:]}
    numbers = json.loads((folder / "result.json").read_text())
    if calibrated:
        tok = load_model("smollm2-135m").tokenizer  # the tokenizer `lowbit quantize smollm2-135m` uses
        ids = calibration_windows(tok, "pydoc", args.samples, args.seq_len, progress=False)
        if numbers["calibration_sha256"] != hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest():
            raise SystemExit(f"{name}: the peer calibrated on other windows than lowbit's GPTQ cells")
    from safetensors.torch import load_file

    model = load_model("smollm2-135m").model
    state = load_file(folder / "model.safetensors")
    _, unexpected = model.load_state_dict(state, strict=False)  # the quantized layers only
    if unexpected or not state:
        raise SystemExit(f"{name}: the peer's weights do not match the model (unexpected: {unexpected[:3]})")
    result = {"cell": name, "scheme": scheme, "method": method, "args": extra,
              "samples": args.samples if calibrated else 0,
              "quantize_seconds": numbers["quantize_seconds"], "wall_seconds": m["seconds"],
              "peak_rss_mb": m["peak_rss_mb"], "bpw": numbers["bpw"], "peer": numbers,
              **{k: score(model, w, refs[k]) for k, w in corpora.items()}}
    shutil.rmtree(folder, ignore_errors=True)
    return result


def _path(cell: str, args) -> Path:
    safe = cell.replace("/", "__").replace(":", "_").replace(" ", "").replace("(", "").replace(")", "").replace("=", "")
    return OUT / f"{safe}-w{args.windows}-l{args.seq_len}-n{args.samples}.json"


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _calibration(r: dict, args) -> str:
    """How a GPTQ cell calibrated: source, windows and dampening; a dash for data-free cells."""
    if r["method"] == "peer:llmcompressor" and r["samples"]:
        return f"pydoc {r['samples']}×{args.seq_len}, damp 0.01, static act-order (llm-compressor's defaults)"
    if r["method"] != "gptq":
        return "—"
    a = r["args"]
    opts = {k: a[i + 1] for i, k in enumerate(a[:-1]) if k in ("--damp", "--calib")}
    damp = opts.get("--damp", f"{DEFAULT_DAMP:g}")
    order = ", act-order" if "--act-order" in a else ", static groups" if "--static-groups" in a else ""
    calib = opts.get("--calib", "pydoc")
    calib = Path(calib).name if "/" in calib else calib
    return f"{calib} {r['samples']}×{args.seq_len}, damp {damp}{order}"


def _kept_rows(path: Path, cmd: str) -> dict[str, str]:
    """The current section's table rows, by cell name, if that section was made with ``cmd``'s settings.

    A cell with no cached result (``--only`` ran others, or ``bench/out`` is gone) keeps its row.
    """
    section = read_section(path, MARK_BEGIN, MARK_END)
    if f"Reproduce: `{cmd}`" not in section:
        return {}
    rows = (line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| cell |"))
    return {line.split("|")[1].strip(): line for line in rows}


def write_markdown(cells: list, args) -> None:
    if not _path("fp32", args).exists():
        raise SystemExit(f"bench/gptq.py: no fp32 scores at {_path('fp32', args)}; run without --report-only first")
    base = json.loads(_path("fp32", args).read_text())
    cmd = f"python3 bench/gptq.py --windows {args.windows} --seq-len {args.seq_len} --samples {args.samples}"
    kept = _kept_rows(HERE.parent / "BENCHMARKS.md", cmd)
    lines = [
        MARK_BEGIN,
        "## SmolLM2-135M-Instruct: round-to-nearest against GPTQ, in and out of domain",
        "",
        f"Reproduce: `{cmd}` (cells cached in `bench/out/gptq/`; `--fresh` recomputes).",
        f"Evaluation: {args.windows} windows of {args.seq_len} tokens from the pydoc evaluation half and from "
        f"{PROSE_NAME}. fp32 perplexity: pydoc {base['pydoc']['ppl']:.3f}, prose {base['prose']['ppl']:.3f}. "
        f"GPTQ calibrates on {args.samples} windows of {args.seq_len} tokens (pydoc calibration half unless the "
        "cell says `self`, text the model generated, or a mix). Quantize seconds exclude loading the model; "
        "peak RSS is the whole `lowbit quantize` process. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        "| cell | calibration | bits/weight | pydoc ppl | × fp32 | pydoc KL | prose ppl | × fp32 | prose KL "
        "| quantize s | peak RSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, *_ in cells:
        if not _path(name, args).exists():
            if name in kept:
                lines.append(kept[name])
            continue
        r = json.loads(_path(name, args).read_text())
        if "error" in r:
            error = r["error"].replace("`", "'").replace("|", "/")  # keep the table cell intact
            lines.append(f"| {r['cell']} | refused: {error} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['cell']} | {_calibration(r, args)} | {r['bpw']:.3f} | {r['pydoc']['ppl']:.3f} | {r['pydoc']['ppl'] / base['pydoc']['ppl']:.3f}"
            f" | {r['pydoc']['kl']:.4f} | {r['prose']['ppl']:.3f} | {r['prose']['ppl'] / base['prose']['ppl']:.3f}"
            f" | {r['prose']['kl']:.4f} | {r['quantize_seconds']:.1f} | {r['peak_rss_mb']:.0f} MiB |")
    lines += ["", MARK_END]
    write_section(HERE.parent / "BENCHMARKS.md", MARK_BEGIN, MARK_END, lines)


if __name__ == "__main__":
    main()
