"""The body of ``lowbit prune``: one-shot pruning as a ``lowbit quantize`` run with a sparsity
scheme, or structured pruning (``--structure``) that saves a smaller dense model.

``lowbit prune MODEL --method sparsegpt --sparsity 0.5 --out DIR`` is ``lowbit quantize MODEL
--scheme s=50% --method sparsegpt --out DIR``; ``--pattern 2:4`` gives ``s=2:4``; ``--quantize
uint4:g64`` adds a weight spec (SparseGPT then prunes and quantizes in one pass; ``--method
wanda+gptq`` prunes, then quantizes keeping the mask). Method options pass through
(``--allocation global --min-keep 0.01``). The report lists the measured sparsity of every layer.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from lowbit.errors import LowbitError

STRUCTURES = ("channels", "heads")


@dataclass
class PruneArgs:
    model: str
    out: Path
    method: str = "wanda"
    sparsity: Optional[float] = None
    pattern: Optional[str] = None
    structure: Optional[str] = None
    quantize: Optional[str] = None
    options: dict = field(default_factory=dict)
    calib: str = "pydoc"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: Optional[int] = None  # None: the method's own, else 8
    resume: bool = False
    max_memory: Optional[str] = None
    overwrite: bool = False
    allow_pickle: bool = False
    evaluate: bool = False
    windows: int = 32
    report: Optional[Path] = None


def sparsity_scheme(sparsity: float | None, pattern: str | None, quantize: str | None) -> str:
    """The scheme string of a prune run: ``[WEIGHT+]s=S`` from --sparsity / --pattern / --quantize."""
    if pattern is None and sparsity is None:
        raise LowbitError("give --sparsity (a fraction in [0, 1), e.g. 0.5) or --pattern (N:M, e.g. 2:4)")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise LowbitError(f"--sparsity {sparsity:g} is outside [0, 1); give the fraction of weights to remove, e.g. 0.5")
    if pattern is not None:
        n, _, m = pattern.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise LowbitError(f"--pattern {pattern!r} is not N:M with 0 < N < M, e.g. 2:4 or 4:8")
        if sparsity is not None and abs(sparsity - (1 - int(n) / int(m))) > 1e-9:
            raise LowbitError(f"--pattern {pattern} removes {1 - int(n) / int(m):g} of the weights, not --sparsity "
                              f"{sparsity:g}; give one of the two")
        part = f"s={n}:{m}"
    elif sparsity == 0:
        raise LowbitError("--sparsity 0 removes nothing; give a fraction in (0, 1), e.g. 0.5")
    else:
        part = f"s={sparsity:.6g}"
    return f"{quantize}+{part}" if quantize else part


def run_prune(console: Console, a: PruneArgs) -> None:
    if a.structure is not None:
        return _structured(console, a)
    from lowbit.cli_quantize import QuantizeArgs, run_quantize

    scheme = sparsity_scheme(a.sparsity, a.pattern, a.quantize)
    run_quantize(console, QuantizeArgs(
        model=a.model, scheme=scheme, out=a.out, method=a.method, options=a.options, calib=a.calib,
        samples=a.samples, seq_len=a.seq_len, seed=a.seed, batch_size=a.batch_size, max_memory=a.max_memory,
        resume=a.resume, overwrite=a.overwrite, allow_pickle=a.allow_pickle, evaluate=a.evaluate,
        windows=a.windows, report=a.report))
    _print_sparsity(console, a.out)


def measured_sparsity(folder: Path) -> list[dict]:
    """Per pruned tensor of a saved folder: key, shape and the fraction of zeros its keep-mask records
    (float pruned weights and quantized ones with a ``mask`` role), read from the files."""
    from lowbit.io import pop_roles, read_manifest, read_weights
    from lowbit.qtensor import QuantizedTensor, unpack_mask

    manifest, tensors = read_manifest(folder), read_weights(folder)
    keeps = {key: unpack_mask(tensors[meta["tensor"]], tuple(meta["shape"])) for key, meta in manifest["masks"].items()}
    for key, meta in manifest["quantized"].items():
        if "same_as" not in meta:
            qt = QuantizedTensor.from_tensors(meta, pop_roles(tensors, key), name=key)
            if qt.mask is not None:
                keeps[key] = qt.mask
    return [{"key": k, "shape": list(m.shape), "sparsity": float((~m).float().mean())} for k, m in sorted(keeps.items())]


def _print_sparsity(console: Console, folder: Path) -> None:
    rows = measured_sparsity(folder)
    if not rows:
        return
    table = Table("pruned tensor", "shape", "sparsity", title="measured sparsity per layer")
    for r in rows:
        table.add_row(r["key"], "×".join(map(str, r["shape"])), f"{r['sparsity']:.4f}")
    console.print(table)
    total = sum(r["sparsity"] * _numel(r["shape"]) for r in rows) / sum(_numel(r["shape"]) for r in rows)
    console.print(f"{len(rows)} tensors pruned; overall sparsity {total:.4f}")


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _structured(console: Console, a: PruneArgs) -> None:
    """Remove MLP channels or attention heads, correct the rest, save a smaller dense model."""
    if a.structure not in STRUCTURES:
        raise LowbitError(f"--structure {a.structure!r} unknown; use one of {', '.join(STRUCTURES)}")
    if a.pattern is not None or a.quantize is not None:
        raise LowbitError("--structure removes whole channels or heads: --pattern and --quantize do not apply; "
                          "quantize the saved model with `lowbit quantize` afterwards")
    if a.sparsity is None or not 0 < a.sparsity < 1:
        raise LowbitError(f"--structure needs --sparsity in (0, 1), the fraction of {a.structure} to remove, "
                          f"e.g. 0.25 (got {a.sparsity})")
    if a.out.exists() and not a.overwrite:
        raise LowbitError(f"output folder {a.out} already exists; choose another --out or pass --overwrite")
    from lowbit.calib import calibration_windows
    from lowbit.hf.load import load_model
    from lowbit.pruning.structured import prune_structured

    loaded = load_model(a.model, allow_pickle=a.allow_pickle)
    if loaded.tokenizer is None:
        raise LowbitError(f"{a.model} has no tokenizer files, which structured pruning needs for its calibration text")
    ids = calibration_windows(loaded.tokenizer, a.calib, a.samples, a.seq_len, a.seed, loaded.model)
    batches = list(ids.split(a.batch_size or 8))
    t0 = time.perf_counter()
    numbers = prune_structured(loaded.model, batches, structure=a.structure, sparsity=a.sparsity, **a.options)
    numbers["seconds"] = time.perf_counter() - t0
    _save_dense(loaded.model, loaded.tokenizer, a.out)
    console.print(f"saved the pruned dense model to {a.out} ({numbers['seconds']:.1f} s)")
    if a.report is not None:
        a.report.write_text(json.dumps(numbers, indent=1, sort_keys=True, default=str) + "\n")


def _save_dense(model, tokenizer, out: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then renamed into place (an old ``out`` is
    replaced only once the new folder is complete)."""
    import os
    import shutil

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
