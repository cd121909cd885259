"""SmolLM2-135M at every preset: perplexity, KL, size on disk, bits per weight, time.

    python3 bench/presets.py [--windows 16] [--seq-len 512] [--only w4g128,nvfp4] [--fresh]

Writes BENCHMARKS.md (the section between the preset markers) from the per-preset results in
bench/out/presets/*.json. A finished preset is not recomputed unless --fresh is given, so a
killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import lowbit  # noqa: E402
from common import reference_logprobs, score, write_section  # noqa: E402
from lowbit.eval import eval_text, token_windows  # noqa: E402
from lowbit.hf.load import load_model  # noqa: E402
from lowbit.report import bits_per_weight, folder_bytes  # noqa: E402
from lowbit.schemes import describe, parse_scheme  # noqa: E402

PRESETS = ["w8", "w8-asym", "w4g128", "w4g128-asym", "w4g64-asym", "w4g32", "w4g32-asym", "w4g32-asym-fz",
           "uint4:g128:mse", "w3g128", "w3g128-asym", "uint3:g128:mse", "uint3:g128:lp3", "w2g64-asym", "fp8", "fp4", "nf4g64",
           "mxfp4", "nvfp4"]
OUT = HERE / "out" / "presets"
MARK_BEGIN, MARK_END = "<!-- presets:begin -->", "<!-- presets:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--only", default=None, help="comma-separated presets")
    ap.add_argument("--fresh", action="store_true", help="recompute finished presets")
    args = ap.parse_args()
    presets = args.only.split(",") if args.only else PRESETS
    OUT.mkdir(parents=True, exist_ok=True)
    loaded = load_model("smollm2-135m")
    windows = token_windows(loaded.tokenizer, eval_text(None), args.seq_len, args.windows)
    todo = [p for p in presets if args.fresh or not _result_path(p, args).exists()]
    if todo:
        ref = reference_logprobs(loaded.model, windows)
        base = _result_path("fp32", args)
        if args.fresh or not base.exists():
            _write(base, {"preset": "fp32", "spec": "-", **score(loaded.model, windows, ref),
                          "bytes": _fp32_bytes(loaded.model), "bpw": 32.0, "quantize_seconds": 0.0})
        for preset in todo:
            print(f"[bench] {preset}", flush=True)
            _write(_result_path(preset, args), run_preset(loaded, preset, windows, ref))
    write_markdown(["fp32", *presets], args)


def run_preset(loaded, preset: str, windows: torch.Tensor, ref: list[torch.Tensor]) -> dict:
    spec = parse_scheme(preset)
    model = copy.deepcopy(loaded.model)
    t0 = time.perf_counter()
    lowbit.quantize(model, spec, progress=False)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        lowbit.save(model, Path(tmp) / "q")
        size = folder_bytes(Path(tmp) / "q" / "model.safetensors")
    return {"preset": preset, "spec": describe(spec), **score(model, windows, ref), "bytes": size,
            "bpw": bits_per_weight(model), "quantize_seconds": seconds}


def _fp32_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        lowbit.save(model, Path(tmp) / "m")
        return folder_bytes(Path(tmp) / "m" / "model.safetensors")


def _result_path(preset: str, args) -> Path:
    safe = preset.replace(":", "_").replace("/", "_")
    return OUT / f"{safe}-w{args.windows}-l{args.seq_len}.json"


def _write(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_markdown(presets: list[str], args) -> None:
    rows = [json.loads(_result_path(p, args).read_text()) for p in presets if _result_path(p, args).exists()]
    base = rows[0]["ppl"]
    cmd = f"python3 bench/presets.py --windows {args.windows} --seq-len {args.seq_len}"
    lines = [
        MARK_BEGIN,
        "## SmolLM2-135M-Instruct: round-to-nearest at every preset",
        "",
        f"Reproduce: `{cmd}` (results cached in `bench/out/presets/`; add `--fresh` to recompute).",
        f"Evaluation: {args.windows} non-overlapping windows of {args.seq_len} tokens from the pydoc evaluation "
        f"half ({rows[0]['tokens']} predicted tokens); KL is mean KL(P_fp32 ‖ P_quantized) in nats per token. "
        "Size is `model.safetensors` of the saved folder (embeddings and lm_head stay fp32 under the default "
        "plan); bits/weight counts codes, scales and zeros of the quantized tensors. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}.",
        "",
        "| preset | spec | perplexity | × fp32 | KL | size on disk | bits/weight | quantize s | eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | `{r['spec']}` | {r['ppl']:.3f} | {r['ppl'] / base:.3f} | {r['kl']:.4f} | "
                     f"{r['bytes'] / 2**20:.1f} MiB | {r['bpw']:.3f} | {r['quantize_seconds']:.1f} | "
                     f"{r['eval_seconds']:.1f} |")
    lines += ["", MARK_END]
    write_section(HERE.parent / "BENCHMARKS.md", MARK_BEGIN, MARK_END, lines)


if __name__ == "__main__":
    main()
