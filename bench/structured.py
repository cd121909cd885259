"""SmolLM2-135M: structured pruning (MLP channels, KV groups) with both criteria, with and without
the least-squares correction: perplexity, prefill time, decode speed against the dense model.

    OMP_NUM_THREADS=1 python3 bench/structured.py [--windows 16] [--samples 32] [--rounds 2] [--fresh]

Every cell prunes the fp32 model (``bench/out/smollm2-135m-hf``, as bench/decode.py makes it) with
``lowbit.pruning.structured.prune_structured``, calibrated on ``--samples`` pydoc windows of 512
(``lowbit.calib.calibration_windows``, as ``lowbit quantize --calib pydoc``), saves it with
``save_pretrained`` to ``bench/out/structured/<cell>/`` and scores it on ``--windows`` windows of 512
of the pydoc evaluation half and of the prose evaluation half (bench/corpora.py): perplexity, the
median of 3 in-process forwards of one 512-token window (prefill), parameters, pruning time. Decode
speed: bench/decode.py's worker (a fresh process per folder, transformers' own fp32 model, one
warm-up, median of ``--repeats`` greedy ``generate`` calls of ``--new-tokens`` after a 32-token pydoc
prompt), repeated over ``--rounds`` rounds (order reversed every other round) to show the noise;
the ratio is against the dense model of the same round. Cells are cached in
``bench/out/structured/cells``; prints a markdown table and writes it to
``bench/out/structured/report.md``. Not part of the test suite.

Measured (idle machine, OMP_NUM_THREADS=1, 6 rounds): 25% of the MLP channels removed and re-fitted
("activation") decodes a median 1.13× the dense model's tokens/s (rounds 0.94 to 1.23×), prefill of
512 tokens about 1.10× faster; perplexity 14.80 → 16.67 (pydoc), 25.70 → 63.65 (prose). fp32 decode is
bound by reading the weights, and this cell reads 114.6M of 134.5M weights per token: at most 1.17×.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from corpora import prose_split  # noqa: E402
from decode import fp32_folder, prompt_ids, run_cell  # noqa: E402

from lowbit.calib import calibration_windows  # noqa: E402
from lowbit.eval import eval_text, perplexity, token_windows  # noqa: E402
from lowbit.hf.load import load_model  # noqa: E402
from lowbit.pruning.structured import prune_structured  # noqa: E402

OUT = HERE / "out" / "structured"
#: (cell, [(structure, sparsity), ...], criterion, correct); SmolLM2 has 3 KV groups: 1/3 removes one
CELLS = [("dense", [], None, None)]
CELLS += [(f"channels 0.25 {c}{'' if k else ' no-refit'}", [("channels", 0.25)], c, k)
          for c in ("hessian", "activation") for k in (True, False)]
CELLS += [(f"heads 1/3 {c}", [("heads", 1 / 3)], c, True) for c in ("hessian", "activation")]
CELLS += [("heads 1/3 hessian no-refit", [("heads", 1 / 3)], "hessian", False),
          ("channels 0.25 + heads 1/3 hessian", [("channels", 0.25), ("heads", 1 / 3)], "hessian", True)]


def slug(cell: str) -> str:
    return cell.replace(" ", "_").replace("/", "of").replace("+", "plus")


@torch.inference_mode()
def prefill_seconds(model, window: torch.Tensor, repeats: int = 3) -> float:
    model(window[None])  # warm-up
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(window[None])
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def quality_cell(cell: tuple, dense: Path, corpora: dict, calib: torch.Tensor, args) -> dict:
    name, steps, criterion, correct = cell
    path = OUT / "cells" / f"{slug(name)}.json"
    if path.exists() and not args.fresh:
        return json.loads(path.read_text())
    loaded = load_model(dense)
    model = loaded.model.eval()
    reports = []
    for structure, sparsity in steps:
        batches = list(calib.split(args.batch))  # (batch, 512) each
        reports.append(prune_structured(model, batches, structure=structure, sparsity=sparsity,
                                        criterion=criterion, correct=correct))
    folder = dense
    if steps:
        folder = OUT / slug(name)
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    row = {"cell": name, "folder": str(folder), "params": sum(p.numel() for p in model.parameters()),
           "prune_s": sum(r["seconds"] for r in reports),
           "mean_error": [statistics.mean(l["error"] for l in r["layers"]) for r in reports],
           "mean_error_sliced": [statistics.mean(l["error_sliced"] for l in r["layers"]) for r in reports],
           "config": {k: getattr(model.config, k) for k in ("intermediate_size", "num_attention_heads",
                                                             "num_key_value_heads")},
           "prefill_s": prefill_seconds(model, corpora["pydoc"][0]), "threads": torch.get_num_threads()}
    for corpus, windows in corpora.items():
        row[f"ppl_{corpus}"] = perplexity(model, windows, progress=False).ppl
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def speed(rows: list[dict], args) -> None:
    """Adds ``tok_s`` (one entry per round) to every row, from bench/decode.py's worker."""
    prompt = prompt_ids(Path(rows[0]["folder"]))
    from transformers import AutoModelForCausalLM

    window = token_windows(load_model(rows[0]["folder"]).tokenizer, eval_text(None), 512, 1)[0]
    for r in rows:
        r["tok_s"], r["prefill_rounds"] = [], []
    for k in range(args.rounds):
        for r in rows if k % 2 == 0 else rows[::-1]:
            model = AutoModelForCausalLM.from_pretrained(r["folder"], dtype=torch.float32).eval()
            r["prefill_rounds"].append(prefill_seconds(model, window))
            del model
            got = run_cell("smollm2-135m", "fp32", Path(r["folder"]), prompt, args.new_tokens, args.repeats)
            if "error" in got:
                raise SystemExit(f"{r['cell']}: decode worker failed: {got['error']}")
            r["tok_s"].append(got["tok_s"])


def table(rows: list[dict], args, command: str) -> list[str]:
    dense = rows[0]
    ratios = [[t / d for t, d in zip(r["tok_s"], dense["tok_s"])] for r in rows]
    best = [max(r["tok_s"]) / max(dense["tok_s"]) for r in rows]  # interference only slows: best of rounds
    median = [statistics.median(x) for x in ratios]
    lines = ["```bash", command, "```", "",
             f"SmolLM2-135M (fp32). Calibration: {args.samples} pydoc windows of 512 (`calibration_windows(tok, "
             f"'pydoc')`). Perplexity: {args.windows} windows of 512 of the pydoc and prose evaluation halves. "
             f"Prefill: median of 3 forwards of one 512-token window (fp32 folder loaded in this process, measured "
             f"in each round just before the decode run). Decode: {args.new_tokens} greedy "
             f"tokens after a 32-token prompt, fresh process per model (bench/decode_worker.py), median of "
             f"{args.repeats}; {args.rounds} rounds, ×dense is against the dense model of the same round. "
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}.", "",
             "| cell | params (M) | I / heads / kv | mean rel. err (sliced → written) | pydoc ppl | prose ppl "
             "| prefill s per round | decode tok/s per round | × dense per round | median × dense | × dense, best of rounds "
             "| prune s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, ratio, b, med in zip(rows, ratios, best, median):
        c = r["config"]
        err = "; ".join(f"{a:.3f} → {b:.3f}" for a, b in zip(r["mean_error_sliced"], r["mean_error"])) or "-"
        lines.append(f"| {r['cell']} | {r['params'] / 1e6:.1f} | {c['intermediate_size']} / "
                     f"{c['num_attention_heads']} / {c['num_key_value_heads']} | {err} | {r['ppl_pydoc']:.2f} | "
                     f"{r['ppl_prose']:.2f} | {', '.join(f'{t:.2f}' for t in r['prefill_rounds'])} | "
                     f"{', '.join(f'{t:.1f}' for t in r['tok_s'])} | {', '.join(f'{x:.2f}' for x in ratio)} | "
                     f"{med:.2f} | {b:.2f} | {r['prune_s']:.0f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="calibration windows per forward")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated cell names (dense always runs)")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--no-speed", action="store_true", help="prune and score only (cells are cached)")
    args = ap.parse_args()
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python3 bench/structured.py " + \
        " ".join(sys.argv[1:])
    dense = fp32_folder("smollm2-135m")
    tok = load_model(dense).tokenizer
    corpora = {"pydoc": token_windows(tok, eval_text(None), 512, args.windows),
               "prose": token_windows(tok, prose_split()[1], 512, args.windows)}
    calib = calibration_windows(tok, "pydoc", args.samples, 512, progress=False)  # (samples, 512) int64
    only = set(filter(None, args.only.split(",")))
    cells = [c for c in CELLS if not only or c[0] in only or c[0] == "dense"]
    rows = [quality_cell(c, dense, corpora, calib, args) for c in cells]
    if args.no_speed:
        return
    speed(rows, args)
    lines = table(rows, args, command)
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
