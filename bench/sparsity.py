"""Zeros per pruned tensor of a saved lowbit folder, read from the files alone (no model class).

    python3 bench/sparsity.py OUT_FOLDER [--min 0.5] [--pattern '\\.layers\\.\\d+\\.'] [--json]

For every tensor the manifest records a keep-mask for (float pruned weights and quantized ones
with a ``mask`` role), and every 2-D weight whose name matches ``--pattern`` (default: the
repeated blocks' matrices, i.e. what the default plan targets), it prints the fraction of zeros
in the stored weight (the dequantized weight for quantized tensors) and checks that the weight is
zero wherever its mask drops it. Exit status 1 when a tensor holds fewer zeros than ``--min`` or
contradicts its mask.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from lowbit.io import pop_roles, read_manifest, read_weights
from lowbit.qtensor import QuantizedTensor, unpack_mask


def tensors_of(folder: Path, pattern: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """key -> (weight as stored, dequantized for quantized tensors; keep-mask or None)."""
    manifest, tensors = read_manifest(folder), read_weights(folder)
    out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for key, meta in manifest["quantized"].items():
        if "same_as" in meta:
            continue
        qt = QuantizedTensor.from_tensors(meta, pop_roles(tensors, key), name=key)
        out[key] = (qt.dequantize(torch.float32), qt.mask)
    for key, meta in manifest["masks"].items():
        out[key] = (tensors[key], unpack_mask(tensors.pop(meta["tensor"]), tuple(meta["shape"])))
    regex = re.compile(pattern)
    for key, t in tensors.items():
        if key not in out and key.endswith(".weight") and t.ndim == 2 and regex.search(key):
            out[key] = (t, None)
    return dict(sorted(out.items()))


def rows(folder: Path, pattern: str) -> list[dict]:
    found = []
    for key, (w, keep) in tensors_of(folder, pattern).items():
        zero = w == 0
        found.append({"key": key, "shape": list(w.shape), "zeros": float(zero.float().mean()),
                      "mask": None if keep is None else float((~keep).float().mean()),
                      "agrees": None if keep is None else bool(zero[~keep].all())})
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--min", type=float, default=0.0, help="fail when a tensor has fewer zeros than this fraction")
    p.add_argument("--pattern", default=r"\.layers\.\d+\.|\.h\.\d+\.|\.block\.\d+\.",
                   help="regex of unmasked 2-D weights to count too (default: the repeated blocks)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    found = rows(a.folder, a.pattern)
    bad = [r for r in found if r["zeros"] < a.min or r["agrees"] is False]
    if a.json:
        print(json.dumps({"tensors": found, "below_min_or_contradicting": [r["key"] for r in bad]}, indent=1))
    else:
        for r in found:
            mask = "no mask" if r["mask"] is None else f"mask drops {r['mask']:.4f}" + ("" if r["agrees"] else " (!)")
            print(f"{r['key']:<50} {str(tuple(r['shape'])):<14} zeros {r['zeros']:.4f}  {mask}")
        zs = [r["zeros"] for r in found]
        print(f"{len(found)} tensors; zeros min {min(zs, default=0):.4f} max {max(zs, default=0):.4f}; "
              f"{len(bad)} below --min {a.min:g} or contradicting their mask")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
