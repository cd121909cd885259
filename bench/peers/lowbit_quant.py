"""lowbit as one of the tools in the side-by-side benchmark, run exactly like the peers.

    python3 bench/peers/lowbit_quant.py --model FOLDER --scheme w4g64-asym --method gptq --work WORK --out DIR

Loads the fp32 folder every tool reads, quantizes with lowbit's Python API (round-to-nearest,
or GPTQ or SignRound with lowbit's defaults on the work folder's calibration windows), saves the model
with ``lowbit.save`` (its size on disk is the saved folder), then loads that folder back with
``lowbit.load``, which is what a user runs, and hands it to the shared evaluator. Quantize
seconds cover ``lowbit.quantize`` alone; peak RSS is read before the reload. ``--scheme fp32``
evaluates the unquantized model: the reference row of every table.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--scheme", required=True, help="a lowbit scheme, or fp32: the unquantized reference row")
    ap.add_argument("--method", choices=("rtn", "gptq", "signround", "magnitude", "wanda", "sparsegpt"), default="rtn",
                    help="a weight method, or a pruning method with a sparsity scheme (s=50%%, s=2:4)")
    ap.add_argument("--damp", type=float, default=None, help="GPTQ dampening (default: lowbit's)")
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a method option, e.g. --set compute=bf16 --set steps=100 (repeatable)")
    ap.add_argument("--batch", type=int, default=None, help="calibration windows per batch (default: the method's)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import lowbit
    from peer_eval import calibration, finish, peak_rss_mb
    from lowbit.algorithms.gptq import DEFAULT_DAMP
    from lowbit.hf.load import load_model
    from lowbit.report import manifest_bits_per_weight

    torch.manual_seed(0)
    loaded = load_model(args.model)
    if args.scheme == "fp32":  # the reference: nothing quantized, sized as the fp32 folder it was loaded from
        finish(args.out, loaded.model, args.work, tool="fp32", version=torch.__version__, quantize_seconds=0.0,
               bpw=32.0, saved=Path(args.model), settings={"scheme": "fp32"})
        return
    options: dict = {}
    calib = None
    if args.method in ("gptq", "signround", "wanda", "sparsegpt"):
        if args.work is None:
            raise SystemExit(f"--method {args.method} needs --work (its calibration windows)")
        calib = calibration(args.work)
    if args.method == "gptq":
        options = {"damp": DEFAULT_DAMP if args.damp is None else args.damp, "act_order": not args.no_act_order}
    elif args.method == "sparsegpt" and args.damp is not None:
        options = {"damp": args.damp}
    options.update(_option(kv) for kv in args.set)
    if args.batch is not None and calib is not None:
        calib = list(calib.split(args.batch))
    t0 = time.perf_counter()
    lowbit.quantize(loaded.model, args.scheme, method=args.method, calib=calib, progress=False, **options)
    seconds = time.perf_counter() - t0
    saved = args.out / "model"
    lowbit.save(loaded.model, saved, tokenizer=loaded.tokenizer, overwrite=True)
    peak = peak_rss_mb()
    del loaded
    model = lowbit.load(saved)
    bpw = manifest_bits_per_weight(saved)  # None for a pruned float model: its weights stay fp32
    finish(args.out, model, args.work, tool="lowbit", version=lowbit.__version__, quantize_seconds=seconds,
           bpw=32.0 if bpw is None else bpw, saved=saved, peak_rss_mb=peak, sparsity=_sparsity(saved),
           settings={"scheme": args.scheme, "method": args.method, **options,
                     "samples": 0 if calib is None else sum(int(b.shape[0]) for b in calib),
                     **({"batch": args.batch} if args.batch else {})})


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as an int, then a float, else kept as text."""
    key, _, value = text.partition("=")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def _sparsity(folder: Path) -> float | None:
    """Fraction of zeros over the saved folder's keep-masks (None when nothing was pruned)."""
    from lowbit.cli_prune import measured_sparsity

    rows = measured_sparsity(folder)
    sizes = [r["shape"][0] * r["shape"][1] for r in rows]
    return sum(r["sparsity"] * n for r, n in zip(rows, sizes)) / sum(sizes) if rows else None


if __name__ == "__main__":
    from _main import run

    run(main)
