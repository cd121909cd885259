"""GPTQ on a 3.4B-parameter random Llama (13.7 GB of fp32 safetensors) under --max-memory 4GB.

    python3 bench/scale.py build /work/scale/llama3b          # once: the model (about 3 min)
    python3 bench/scale_gptq.py /work/scale/llama3b [--resume]

Runs ``lowbit quantize --method gptq`` in a child process measured by ``bench/rss.py`` (wall
time, peak RSS of the process tree) and appends the run to ``bench/out/scale/runs.json``; with
``--resume`` it continues a killed run (the runs are then summed: time adds, peak is the max).
Writes the section of BENCHMARKS.md between the scale markers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import write_section  # noqa: E402
from rss import measure  # noqa: E402

OUT = HERE / "out" / "scale"
MARK_BEGIN, MARK_END = "<!-- scale:begin -->", "<!-- scale:end -->"
ARGS = ["--method", "gptq", "--scheme", "w4g128", "--samples", "8", "--seq-len", "256", "--max-memory", "4GB"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="quantized folder (default: MODEL-gptq-w4g128)")
    ap.add_argument("--resume", action="store_true", help="continue a killed run")
    args = ap.parse_args()
    out = args.out or args.model.with_name(args.model.name + "-gptq-w4g128")
    OUT.mkdir(parents=True, exist_ok=True)
    runs_path = OUT / "runs.json"
    runs = json.loads(runs_path.read_text()) if args.resume and runs_path.exists() else []
    cmd = ["lowbit", "quantize", str(args.model), "--out", str(out), "--overwrite", *ARGS]
    cmd += ["--resume"] if args.resume else []
    m = measure(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, echo=True)
    runs.append({k: m[k] for k in ("cmd", "seconds", "peak_rss_mb", "returncode", "stdout_tail")})
    runs_path.write_text(json.dumps(runs, indent=1))
    if m["returncode"] == 0:
        write_markdown(runs, args.model, out)


def write_markdown(runs: list[dict], model: Path, out: Path) -> None:
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    qsize = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    out_text = next((r["stdout_tail"] for r in runs if "forecast:" in r["stdout_tail"]), "")
    forecast = out_text[out_text.find("forecast:"):]
    forecast = " ".join(forecast[:forecast.find(" min") + 4].split())  # rich may wrap the line
    parts = " + ".join(f"{r['seconds'] / 60:.1f} min" for r in runs)
    lines = [
        MARK_BEGIN,
        "## Scale: GPTQ on a 3.4B-parameter Llama in under 4 GB",
        "",
        f"Reproduce: `python3 bench/scale.py build {model}` then `python3 bench/scale_gptq.py {model}`.",
        f"Model: Llama architecture, 3.43B parameters, random weights (seeded), {size / 1e9:.1f} GB of fp32 "
        f"safetensors. Run: `lowbit quantize MODEL {' '.join(ARGS)}`; weights stream block by block from "
        f"the memory-mapped shards. Machine: {platform.machine()}, {os.cpu_count()} cores.",
        "",
        "| peak RSS (whole process) | wall time | output size | runs |",
        "|---:|---:|---:|---|",
        f"| {max(r['peak_rss_mb'] for r in runs) / 1024:.2f} GiB | {sum(r['seconds'] for r in runs) / 60:.1f} min "
        f"| {qsize / 1e9:.2f} GB | {len(runs)} ({parts}) |",
        "",
        f"lowbit's own forecast before the run: `{forecast.strip()}`",
        "",
        MARK_END,
    ]
    write_section(HERE.parent / "BENCHMARKS.md", MARK_BEGIN, MARK_END, lines)


if __name__ == "__main__":
    main()
