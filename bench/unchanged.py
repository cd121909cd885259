"""Do the data-free methods still give the same weights? SHA-256 of every dequantized tensor.

    python3 bench/unchanged.py --write     # compare, then record bench/golden/dequant_sha256.json
    python3 bench/unchanged.py             # compare against it (after a change); exit 1 on a difference
    python3 bench/unchanged.py --only "uint4_fz:g64:hqq (rtn)"    # one case (comma-separated names)

SmolLM2-135M under round-to-nearest ``uint4:g128``, HQQ's zero ``uint4_fz:g64:hqq``, NUPES
``pow4_a0.5:g64``, ``nf4:g64`` and ``mxfp4``: each quantized tensor is dequantized to float32 and
hashed, so "the dequantized weights equal those before, bit for bit" is checked tensor by tensor.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.hf.load import load_model

GOLDEN = Path(__file__).resolve().parent / "golden" / "dequant_sha256.json"
CASES = [("uint4:g128", "rtn"), ("uint4_fz:g64:hqq", "rtn"), ("pow4_a0.5:g64", "nupes"), ("nf4:g64", "rtn"),
         ("mxfp4", "rtn")]


def hashes(model: torch.nn.Module, scheme: str, method: str) -> dict[str, str]:
    from lowbit.nn.reference import quantized_tensors

    m = copy.deepcopy(model)
    lowbit.quantize(m, scheme, method=method, progress=False)
    out = {}
    for name, param, qt, _ in quantized_tensors(m):
        w = qt.dequantize(torch.float32).contiguous()
        out[f"{name}.{param}"] = hashlib.sha256(w.numpy().tobytes()).hexdigest()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="compare, then record the golden hashes (exit 0)")
    ap.add_argument("--only", default=None, help="comma-separated cases, e.g. 'nf4:g64 (rtn)'; with "
                    "--write, only these cases are re-recorded")
    args = ap.parse_args()
    names = [f"{scheme} ({method})" for scheme, method in CASES]
    only = names if args.only is None else [c.strip() for c in args.only.split(",")]
    unknown = sorted(set(only) - set(names))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; use some of {names}")
    model = load_model("smollm2-135m").model
    now = {f"{scheme} ({method})": hashes(model, scheme, method) for scheme, method in CASES
           if f"{scheme} ({method})" in only}
    bad = compare(now, only)
    if args.write:
        if args.only is not None and GOLDEN.exists():
            now = {**json.loads(GOLDEN.read_text()), **now}
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    return 1 if bad else 0


def compare(now: dict[str, dict[str, str]], only: list[str]) -> int:
    """Print, per case, how many tensors hash as in the golden file; -> the number that differ."""
    if not GOLDEN.exists():
        return 0
    golden = json.loads(GOLDEN.read_text())
    bad = 0
    for case, tensors in golden.items():
        if case not in only:
            continue
        diff = [k for k, h in tensors.items() if now.get(case, {}).get(k) != h]
        print(f"{case}: {len(tensors) - len(diff)}/{len(tensors)} tensors identical", flush=True)
        bad += len(diff)
    return bad


if __name__ == "__main__":
    sys.exit(main())
